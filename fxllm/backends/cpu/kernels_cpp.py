"""C++ source of the CPU paged-attention kernels (compiled at first use by Inductor's C++ code cache).

Plain C++ with OpenMP and no PyTorch headers, so it compiles in about a second. Scalars are float32
(dtype code 0) or bfloat16 (code 1, stored as uint16); everything is computed in float32.
"""

from __future__ import annotations

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

# Scores of one query head against its sequence's keys without a fast path: the generic loop runs.
_QK_GENERIC = r"""
template <typename T>
static inline bool qk_fast(const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, float, float, float*) {
    return false;
}
"""

# The weighted sum of values and the softmax without a fast path: the generic loops run.
_PV_GENERIC = r"""
static inline bool softmax_fast(float*, int64_t, int64_t, const float*, float*) { return false; }
template <typename T>
static inline bool pv_fast(const float*, int64_t, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, const float*, T*) {
    return false;
}
"""

# AVX-512 paths for float32 and the value sum of both dtypes. Scores: four tokens at a time with FMA
# (as the bfloat16 path below). Values: every query head of the group at once with its sums in
# registers, so each value row is read and widened once, not once per head; the generic loop kept
# a sum in memory and re-read the rows for each of the group's heads.
_AVX512_COMMON = r"""
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

TARGET_AVX512 static inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
TARGET_AVX512 static inline __m512 widen16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
TARGET_AVX512 static inline void narrow16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
TARGET_AVX512 static inline void narrow16(uint16_t* p, __m512 v) {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, v);
    for (int i = 0; i < 16; ++i) store_f(p, i, tmp[i]);  // round to nearest even, as torch's cast
}

// exp_nonpositive on 16 lanes (same polynomial and range reduction).
TARGET_AVX512 static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                             _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Softmax numerators in place for each of the group's score rows, and 1 / their sum (sink included).
// Returns true (the generic per-row loop, whose exp did not vectorise, is skipped).
TARGET_AVX512 static inline bool softmax_fast(float* scores, int64_t n, int64_t group, const float* sinks,
                                              float* inv_totals) {
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * n;
        __m512 mv = _mm512_set1_ps(sinks ? sinks[g] : -INFINITY);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 mask = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1u);
            mv = _mm512_mask_max_ps(mv, mask, mv, _mm512_maskz_loadu_ps(mask, sg + i));
        }
        const float m = _mm512_reduce_max_ps(mv);
        const __m512 mb = _mm512_set1_ps(m);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 mask = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1u);
            __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + i), mb));
            _mm512_mask_storeu_ps(sg + i, mask, e);
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
        float total = _mm512_reduce_add_ps(sum) + (sinks ? exp_nonpositive(sinks[g] - m) : 0.f);
        inv_totals[g] = total > 0.f ? 1.f / total : 0.f;
    }
    return true;
}

template <int G, int C, typename T>
TARGET_AVX512 static void pv_tile(const float* scores, int64_t n, const T* v_cache, const int32_t* table,
                                  int64_t start, int64_t len, int64_t block_size, int64_t v_token,
                                  int64_t head_offset, const float* inv_totals, T* out) {
    __m512 acc[G][C];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = start; t < len;) {
        const int64_t block = table[t / block_size], offset = t % block_size;
        const int64_t stop = std::min(len, t + (block_size - offset));
        const T* v = v_cache + (block * block_size + offset) * v_token + head_offset;
        for (; t < stop; ++t, v += v_token) {
            __m512 row[C];
            for (int c = 0; c < C; ++c) row[c] = widen16(v + 16 * c);
            for (int g = 0; g < G; ++g) {
                __m512 p = _mm512_set1_ps(scores[g * n + (t - start)]);
                for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, row[c], acc[g][c]);
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        __m512 inv = _mm512_set1_ps(inv_totals[g]);
        for (int c = 0; c < C; ++c) narrow16(out + g * C * 16 + 16 * c, _mm512_mul_ps(acc[g][c], inv));
    }
}

template <typename T>
TARGET_AVX512 static inline bool pv_fast(const float* scores, int64_t n, const T* v_cache, const int32_t* table,
                                         int64_t start, int64_t len, int64_t block_size, int64_t v_token,
                                         int64_t head_offset, int64_t head_dim_v, int64_t group,
                                         const float* inv_totals, T* out) {
#define PV_CASE(G, C)                                                                                         \
    if (group == G && head_dim_v == 16 * C) {                                                               \
        pv_tile<G, C, T>(scores, n, v_cache, table, start, len, block_size, v_token, head_offset, inv_totals, \
                         out);                                                                              \
        return true;                                                                                        \
    }
    PV_CASE(1, 4) PV_CASE(2, 4) PV_CASE(3, 4) PV_CASE(4, 4) PV_CASE(5, 4) PV_CASE(6, 4)
    PV_CASE(1, 8) PV_CASE(2, 8) PV_CASE(3, 8)
#undef PV_CASE
    return false;
}

TARGET_AVX512 static inline bool qk_fast(const float* q, const float* k_cache, const int32_t* table, int64_t start,
                                         int64_t len, int64_t block_size, int64_t k_token, int64_t head_offset,
                                         int64_t head_dim, float scale, float softcap, float* scores) {
    if (softcap > 0.f || head_dim % 16 != 0 || head_dim > 256) return false;
    const int64_t chunks = head_dim / 16;
    __m512 qv[16];
    for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    for (int64_t t = start; t < len;) {
        const int64_t block = table[t / block_size], offset = t % block_size;
        const int64_t stop = std::min(len, t + (block_size - offset));
        const float* k = k_cache + (block * block_size + offset) * k_token + head_offset;
        for (; t + 4 <= stop; t += 4, k += 4 * k_token) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
                const float* kc = k + 16 * c;
                a0 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kc), a0);
                a1 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kc + k_token), a1);
                a2 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kc + 2 * k_token), a2);
                a3 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kc + 3 * k_token), a3);
            }
            scores[t - start] = _mm512_reduce_add_ps(a0) * scale;
            scores[t + 1 - start] = _mm512_reduce_add_ps(a1) * scale;
            scores[t + 2 - start] = _mm512_reduce_add_ps(a2) * scale;
            scores[t + 3 - start] = _mm512_reduce_add_ps(a3) * scale;
        }
        for (; t < stop; ++t, k += k_token) {
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) a0 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), a0);
            scores[t - start] = _mm512_reduce_add_ps(a0) * scale;
        }
    }
    return true;
}
"""

# bfloat16 scores with VDPBF16PS (avx512_bf16): products of two bf16 values are exact in float32,
# so only the summation order differs from the generic float32 loop. Four tokens at a time keep four
# independent horizontal sums in flight; one dot per token waited on its own reduction, which made
# the scores ~70% of the kernel's time (243 -> 125 us per call for 16 sequences x 170 tokens, 2 cores).
_QK_AVX512_BF16 = r"""
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static inline bool qk_fast(const uint16_t* q, const uint16_t* k_cache, const int32_t* table, int64_t start,
                           int64_t len, int64_t block_size, int64_t k_token, int64_t head_offset, int64_t head_dim,
                           float scale, float softcap, float* scores) {
    if (softcap > 0.f || head_dim % 32 != 0 || head_dim > 256) return false;
    const int64_t chunks = head_dim / 32;
    __m512bh qv[8];
    for (int64_t c = 0; c < chunks; ++c) qv[c] = (__m512bh)_mm512_loadu_si512((const void*)(q + 32 * c));
    for (int64_t t = start; t < len;) {
        const int64_t block = table[t / block_size], offset = t % block_size;
        const int64_t stop = std::min(len, t + (block_size - offset));
        const uint16_t* k = k_cache + (block * block_size + offset) * k_token + head_offset;
        for (; t + 4 <= stop; t += 4, k += 4 * k_token) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
                const uint16_t* kc = k + 32 * c;
                a0 = _mm512_dpbf16_ps(a0, qv[c], (__m512bh)_mm512_loadu_si512((const void*)kc));
                a1 = _mm512_dpbf16_ps(a1, qv[c], (__m512bh)_mm512_loadu_si512((const void*)(kc + k_token)));
                a2 = _mm512_dpbf16_ps(a2, qv[c], (__m512bh)_mm512_loadu_si512((const void*)(kc + 2 * k_token)));
                a3 = _mm512_dpbf16_ps(a3, qv[c], (__m512bh)_mm512_loadu_si512((const void*)(kc + 3 * k_token)));
            }
            scores[t - start] = _mm512_reduce_add_ps(a0) * scale;
            scores[t + 1 - start] = _mm512_reduce_add_ps(a1) * scale;
            scores[t + 2 - start] = _mm512_reduce_add_ps(a2) * scale;
            scores[t + 3 - start] = _mm512_reduce_add_ps(a3) * scale;
        }
        for (; t < stop; ++t, k += k_token) {
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c)
                a0 = _mm512_dpbf16_ps(a0, qv[c], (__m512bh)_mm512_loadu_si512((const void*)(k + 32 * c)));
            scores[t - start] = _mm512_reduce_add_ps(a0) * scale;
        }
    }
    return true;
}
"""


def decode_source(avx512: bool, avx512_bf16: bool) -> str:
    """The decode kernel with the AVX-512 paths this CPU supports (bfloat16 scores need avx512_bf16)."""
    if not avx512:
        return DECODE_SOURCE.replace("QK_FAST", _QK_GENERIC).replace("PV_FAST", _PV_GENERIC)
    fast = _QK_GENERIC + _AVX512_COMMON + (_QK_AVX512_BF16 if avx512_bf16 else "")
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
