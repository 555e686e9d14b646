"""C++ source of the CPU paged-attention kernels (compiled at first use by Inductor's C++ code cache).

Plain C++ with OpenMP and no PyTorch headers, so it compiles in about a second. Scalars are float32
(dtype code 0) or bfloat16 (code 1, stored as uint16); everything is computed in float32.
"""

from __future__ import annotations

from fxllm.backends.cpu.attention_simd_cpp import AVX512_COMMON, PV_GENERIC, QK_AVX512_BF16, QK_GENERIC

_COMMON = r"""
// Inductor builds with -fno-tree-loop-vectorize and -fmath-errno (its own kernels vectorise by hand);
// these kernels are plain loops, so turn the loop vectoriser back on for this file.
#pragma GCC optimize("tree-loop-vectorize", "no-math-errno")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

static inline float load_f(const float* p, int64_t i) { return p[i]; }
static inline float load_f(const uint16_t* p, int64_t i) {
    uint32_t bits = uint32_t(p[i]) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}
static inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
static inline void store_f(uint16_t* p, int64_t i, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { p[i] = uint16_t((bits >> 16) | 0x40u); return; }  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even, as torch's float -> bfloat16 cast
    p[i] = uint16_t(bits >> 16);
}
"""

WRITE_KV_SOURCE = (
    _COMMON
    + r"""
// Copy row t of k/v ([T, row] with token strides k_stride/v_stride) to slot slots[t]; slots < 0 are skipped.
template <typename T>
static void write_rows(const T* k, const T* v, T* k_cache, T* v_cache, const int64_t* slots, int64_t num_tokens,
                       int64_t k_stride, int64_t v_stride, int64_t k_row, int64_t v_row) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        int64_t slot = slots[t];
        if (slot < 0) continue;
        std::memcpy(k_cache + slot * k_row, k + t * k_stride, k_row * sizeof(T));
        std::memcpy(v_cache + slot * v_row, v + t * v_stride, v_row * sizeof(T));
    }
}

void kernel(int64_t dtype, const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
            int64_t num_tokens, int64_t k_stride, int64_t v_stride, int64_t k_row, int64_t v_row) {
    if (dtype == 0)
        write_rows((const float*)k, (const float*)v, (float*)k_cache, (float*)v_cache, slots, num_tokens,
                   k_stride, v_stride, k_row, v_row);
    else
        write_rows((const uint16_t*)k, (const uint16_t*)v, (uint16_t*)k_cache, (uint16_t*)v_cache, slots,
                   num_tokens, k_stride, v_stride, k_row, v_row);
}
"""
)

DECODE_SOURCE = (
    _COMMON
    + r"""
#include <omp.h>

// exp for x <= 0 (softmax after subtracting the max) in plain arithmetic, so the loop vectorises
// (libm's expf does not here); relative error ~2e-7, and it flushes to 0 below -87.
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    float n = std::nearbyint(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = (int32_t(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

QK_FAST
PV_FAST
// One sequence, one KV head: its `group` query heads attend to the sequence's first `len` cached tokens.
// HD > 0 fixes head_dim == head_dim_v at compile time, so the per-row loops unroll into registers.
template <typename T, int HD>
static void attend_one(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t len,
                       T* out, int64_t group, int64_t head_dim_rt, int64_t head_dim_v_rt, int64_t num_kv_heads,
                       int64_t head, int64_t block_size, float scale, int64_t window, float softcap,
                       const float* sinks, std::vector<float>& work) {
    const int64_t head_dim = HD > 0 ? HD : head_dim_rt;
    const int64_t head_dim_v = HD > 0 ? HD : head_dim_v_rt;
    int64_t start = window > 0 ? (len - window > 0 ? len - window : 0) : 0;
    int64_t n = len - start;
    work.resize(group * head_dim + group * n + head_dim_v + group);
    float* qf = work.data();
    float* scores = qf + group * head_dim;
    float* acc = scores + group * n;
    for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = load_f(q, i);
    int64_t k_token = num_kv_heads * head_dim, v_token = num_kv_heads * head_dim_v;
    for (int64_t g = 0; g < group; ++g) {
        const float* qg = qf + g * head_dim;
        float* sg = scores + g * n;
        if (qk_fast(q + g * head_dim, k_cache, table, start, len, block_size, k_token, head * head_dim, head_dim,
                    scale, softcap, sg))
            continue;
        for (int64_t t = start; t < len; ++t) {
            int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
            const T* k = k_cache + slot * k_token + head * head_dim;
            float sum = 0.f;
            #pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < head_dim; ++d) sum += qg[d] * load_f(k, d);
            sum *= scale;
            if (softcap > 0.f) sum = std::tanh(sum / softcap) * softcap;
            sg[t - start] = sum;
        }
    }
    float* totals = acc + head_dim_v;
    if (!softmax_fast(scores, n, group, sinks, totals)) {
        for (int64_t g = 0; g < group; ++g) {
            float* sg = scores + g * n;
            float m = sinks ? sinks[g] : -INFINITY;
            #pragma omp simd reduction(max : m)
            for (int64_t i = 0; i < n; ++i) m = sg[i] > m ? sg[i] : m;
            float total = sinks ? exp_nonpositive(sinks[g] - m) : 0.f;
            #pragma omp simd reduction(+ : total)
            for (int64_t i = 0; i < n; ++i) {
                sg[i] = exp_nonpositive(sg[i] - m);
                total += sg[i];
            }
            totals[g] = total > 0.f ? 1.f / total : 0.f;
        }
    }
    if (pv_fast(scores, n, v_cache, table, start, len, block_size, v_token, head * head_dim_v, head_dim_v, group,
                totals, out))
        return;
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * n;
        #pragma omp simd
        for (int64_t d = 0; d < head_dim_v; ++d) acc[d] = 0.f;
        for (int64_t t = start; t < len; ++t) {
            int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
            const T* v = v_cache + slot * v_token + head * head_dim_v;
            float p = sg[t - start];
            #pragma omp simd
            for (int64_t d = 0; d < head_dim_v; ++d) acc[d] += p * load_f(v, d);
        }
        for (int64_t d = 0; d < head_dim_v; ++d) store_f(out, g * head_dim_v + d, acc[d] * totals[g]);
    }
}

// Query row t belongs to the sequence whose query_start_loc range holds it and sees that sequence's keys
// up to its own position (causal), so one routine serves decode (a row per sequence), prefill and
// chunked prefill. Rows past the last sequence are padding and get zeros.
template <typename T>
static void attend_rows(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                        const int32_t* seq_lens, const int32_t* query_start_loc, T* out, const float* sinks,
                        int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t head_dim_v, int64_t block_size, int64_t q_stride,
                        int64_t table_stride, float scale, int64_t window, float softcap, int64_t num_threads) {
    int64_t group = num_heads / num_kv_heads;
    std::vector<int32_t> row_seq(num_tokens, -1), row_len(num_tokens, 0);
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t begin = query_start_loc[s], end = query_start_loc[s + 1];
        for (int64_t t = begin; t < end && t < num_tokens; ++t) {
            row_seq[t] = int32_t(s);
            row_len[t] = int32_t(seq_lens[s] - (end - t) + 1);
        }
    }
    int64_t tasks = num_tokens * num_kv_heads;
    auto attend = &attend_one<T, 0>;
    if (head_dim == head_dim_v && head_dim == 64) attend = &attend_one<T, 64>;
    if (head_dim == head_dim_v && head_dim == 128) attend = &attend_one<T, 128>;
    #pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> work;
        #pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < tasks; ++task) {
            int64_t t = task / num_kv_heads, h = task % num_kv_heads, s = row_seq[t];
            T* o = out + (t * num_heads + h * group) * head_dim_v;
            if (s < 0) {
                for (int64_t i = 0; i < group * head_dim_v; ++i) store_f(o, i, 0.f);
                continue;
            }
            attend(q + t * q_stride + h * group * head_dim, k_cache, v_cache, block_tables + s * table_stride,
                   int64_t(row_len[t]), o, group, head_dim, head_dim_v, num_kv_heads, h, block_size, scale, window,
                   softcap, sinks ? sinks + h * group : nullptr, work);
        }
    }
}

void kernel(int64_t dtype, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,
            const int32_t* seq_lens, const int32_t* query_start_loc, void* out, const float* sinks,
            int64_t has_sinks, int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
            int64_t head_dim, int64_t head_dim_v, int64_t block_size, int64_t q_stride, int64_t table_stride,
            float scale, int64_t window, float softcap, int64_t num_threads) {
    const float* sink_ptr = has_sinks ? sinks : nullptr;
    if (dtype == 0)
        attend_rows((const float*)q, (const float*)k_cache, (const float*)v_cache, block_tables, seq_lens,
                    query_start_loc, (float*)out, sink_ptr, num_seqs, num_tokens, num_heads, num_kv_heads,
                    head_dim, head_dim_v, block_size, q_stride, table_stride, scale, window, softcap, num_threads);
    else
        attend_rows((const uint16_t*)q, (const uint16_t*)k_cache, (const uint16_t*)v_cache, block_tables, seq_lens,
                    query_start_loc, (uint16_t*)out, sink_ptr, num_seqs, num_tokens, num_heads, num_kv_heads,
                    head_dim, head_dim_v, block_size, q_stride, table_stride, scale, window, softcap, num_threads);
}
"""
)


def decode_source(avx512: bool, avx512_bf16: bool) -> str:
    """The attention kernel (every step kind) with the AVX-512 paths this CPU supports (bf16 scores: avx512_bf16)."""
    if not avx512:
        return DECODE_SOURCE.replace("QK_FAST", QK_GENERIC).replace("PV_FAST", PV_GENERIC)
    fast = QK_GENERIC + AVX512_COMMON + (QK_AVX512_BF16 if avx512_bf16 else "")
    return DECODE_SOURCE.replace("QK_FAST", fast).replace("PV_FAST", "")


WRITE_KV_ARGS = ["int64_t", "const void*", "const void*", "void*", "void*", "const int64_t*"] + [
    "int64_t"
] * 5
DECODE_ARGS = (
    [
        "int64_t",
        "const void*",
        "const void*",
        "const void*",
        "const int32_t*",
        "const int32_t*",
        "const int32_t*",
    ]
    + ["void*", "const float*", "int64_t"]
    + ["int64_t"] * 9
    + ["float", "int64_t", "float", "int64_t"]
)
