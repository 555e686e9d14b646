// The attention of fxllm_cpu::paged_attention: every step kind (decode, prefill, chunked prefill, mixed) in
// one call.
//
// The reference gathers every sequence's blocks into a padded float32 copy per layer and runs two small
// matmuls; at batch 16 that copying was about half of a bfloat16 decode step. This kernel reads keys and
// values straight from the paged cache, one (query row, KV head) per task across OpenMP threads, with float32
// scores, softmax and accumulation; each query row sees its sequence's keys up to its own position (16 x
// 128-token prompts, bf16: the prefill step 720 ms with per-sequence SDPA -> 622 ms). The AVX-512 paths
// (attention_avx512.h) run where the CPU has the instructions; the plain loops below are the rest.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_avx512.h"
#include "bf16.h"
#include "exp.h"
#include "kernels.h"

namespace fxllm_cpu {

// Which AVX-512 paths a call may take: the scores' (float32: AVX-512, bfloat16: AVX512-BF16), and the
// softmax and value sum's (AVX-512).
struct FastPaths {
    bool qk;
    bool softmax_pv;
};

// One sequence, one KV head: its `group` query heads attend to the sequence's first `len` cached tokens.
// HD > 0 fixes head_dim == head_dim_v at compile time, so the per-row loops unroll into registers.
template <typename T, int HD>
static void attend_one(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t len,
                       T* out, int64_t group, int64_t head_dim_rt, int64_t head_dim_v_rt, int64_t num_kv_heads,
                       int64_t head, int64_t block_size, float scale, int64_t window, float softcap,
                       const float* sinks, FastPaths fast, std::vector<float>& work) {
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
        if (fast.qk && qk_fast(q + g * head_dim, k_cache, table, start, len, block_size, k_token, head * head_dim,
                               head_dim, scale, softcap, sg))
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
    if (!(fast.softmax_pv && softmax_fast(scores, n, group, sinks, totals))) {
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
    if (fast.softmax_pv && pv_fast(scores, n, v_cache, table, start, len, block_size, v_token,
                                   head * head_dim_v, head_dim_v, group, totals, out))
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
static void attend_rows(const T* q, const T* k_cache, const T* v_cache, T* out, const AttentionArgs& a,
                        FastPaths fast) {
    const int64_t num_tokens = a.num_tokens, num_kv_heads = a.num_kv_heads, num_heads = a.num_heads;
    const int64_t head_dim = a.head_dim, head_dim_v = a.head_dim_v;
    const int64_t group = num_heads / num_kv_heads;
    std::vector<int32_t> row_seq(num_tokens, -1), row_len(num_tokens, 0);
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        const int64_t begin = a.query_start_loc[s], end = a.query_start_loc[s + 1];
        for (int64_t t = begin; t < end && t < num_tokens; ++t) {
            row_seq[t] = int32_t(s);
            row_len[t] = int32_t(a.seq_lens[s] - (end - t) + 1);
        }
    }
    const int64_t tasks = num_tokens * num_kv_heads;
    auto attend = &attend_one<T, 0>;
    if (head_dim == head_dim_v && head_dim == 64) attend = &attend_one<T, 64>;
    if (head_dim == head_dim_v && head_dim == 128) attend = &attend_one<T, 128>;
    #pragma omp parallel num_threads(a.num_threads)
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
            attend(q + t * a.q_stride + h * group * head_dim, k_cache, v_cache, a.block_tables + s * a.table_stride,
                   int64_t(row_len[t]), o, group, head_dim, head_dim_v, num_kv_heads, h, a.block_size, a.scale,
                   a.window, a.softcap, a.sinks ? a.sinks + h * group : nullptr, fast, work);
        }
    }
}

void paged_attention(DType dtype, const AttentionArgs& a, const Isa& isa) {
    if (dtype == DType::kFloat32)
        attend_rows((const float*)a.q, (const float*)a.k_cache, (const float*)a.v_cache, (float*)a.out, a,
                    FastPaths{isa.avx512, isa.avx512});
    else
        attend_rows((const uint16_t*)a.q, (const uint16_t*)a.k_cache, (const uint16_t*)a.v_cache,
                    (uint16_t*)a.out, a, FastPaths{isa.avx512_bf16, isa.avx512});
}

}  // namespace fxllm_cpu
