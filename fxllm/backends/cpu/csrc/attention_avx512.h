// AVX-512 paths of the CPU attention kernel (attention.cpp calls them where the CPU has the instructions).
//
// float32 scores: four tokens at a time with FMA (as the bfloat16 path below). Values: every query head of
// the group at once with its sums in registers, so each value row is read and widened once, not once per
// head; the plain loop keeps a sum in memory and re-reads the rows for each of the group's heads. Each path
// returns false where it does not apply (softcap, head sizes it has no tile for), and the plain loop runs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "exp.h"

namespace fxllm_cpu {

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

// bfloat16 scores with VDPBF16PS (avx512_bf16): products of two bf16 values are exact in float32, so only the
// summation order differs from the plain float32 loop. Four tokens at a time keep four independent horizontal
// sums in flight; one dot per token waited on its own reduction, which made the scores ~70% of the kernel's
// time (243 -> 125 us per call for 16 sequences x 170 tokens, 2 cores).
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

}  // namespace fxllm_cpu
