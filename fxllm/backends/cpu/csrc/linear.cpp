// The packed-weight GEMM behind fxllm_cpu::packed_linear (AVX-512, OpenMP).
//
// Weights arrive pre-packed in blocks of 16 output features (see fxllm/ops/linear.py): float32 as
// [N/16, K, 16] and bfloat16 as [N/16, K/2, 16, 2], the pair layout VDPBF16PS reads. One block row is one
// 64-byte load, and every input value is broadcast against it, so no horizontal sums are needed. A register
// tile is up to 4 rows of x by 4 blocks (64 outputs, 16 accumulators); threads split the output blocks, so at
// batch 1 each thread streams its own part of the weights. From 5 to 32 rows (decode of several requests) a
// tall tile of up to 16 rows x 1 block reads each weight once, with a software prefetch ahead in the stream:
// all SmolLM2 projections at 16 rows, cold weights, 2 cores: bfloat16 9.6 -> 7.1 ms, float32 19.4 ->
// 14.3-15.3 ms; a plain tall tile without the prefetch was slower than the 4x4 one. Sums are float32;
// bfloat16 outputs are rounded to nearest even like torch's cast.
//
// Measured on the 2-core dev box (Zen 5, SmolLM2 shapes, every layer's weights distinct so they stream from
// DRAM): bfloat16 at 1 token per step, 6.6 ms for all 121 projections (oneDNN with pre-packed weights: 7.0 ms
// without the LM head); 16 tokens 10.2 ms (oneDNN ~11.4 ms); a 2048-token prefill layer 17.2 ms (oneDNN
// 16.3). float32 at 2048 tokens: 39.7 ms (MKL 70 ms).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace fxllm_cpu {

#define TARGET_F32 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kBlock = 16;   // output features per packed block
constexpr int64_t kRowsPerChunk = 64;  // rows of x kept hot in L1/L2 while a thread sweeps its blocks
// Batches of kTallMinM..kTallMaxM rows (decode with several requests) use tall tiles of up to kTallRows rows
// x 1 block instead: each weight vector loaded serves all the rows, so the weights are read once, and a
// software prefetch kPrefetchBytes ahead in the block's stream keeps DRAM busy while the FMAs run (the
// hardware prefetcher alone does not run far enough ahead of this compute-heavy loop).
constexpr int kTallRows = 16;
constexpr int64_t kTallMinM = 5;
constexpr int64_t kTallMaxM = 32;
constexpr int kPrefetchBytes = 8192;

TARGET_F32 static inline void store_row(float* out, __m512 v, __mmask16 mask) {
    _mm512_mask_storeu_ps(out, mask, v);
}
TARGET_BF16 static inline void store_row(uint16_t* out, __m512 v, __mmask16 mask) {
    __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(out, mask, bits);
}

// Adds the bias and stores the finished sums of a tile (both dtypes' tiles end here); last_mask = outputs
// of the last block that exist.
template <int MT, int NT, typename T>
TARGET_F32 static inline void store_tile(__m512 (&acc)[MT][NT], T* out, int64_t out_stride, const float* bias,
                                         __mmask16 last_mask) {
    for (int m = 0; m < MT; ++m)
        for (int b = 0; b < NT; ++b) {
            __m512 v = acc[m][b];
            __mmask16 mask = b == NT - 1 ? last_mask : (__mmask16)0xffff;
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + b * kBlock));
            store_row(out + m * out_stride + b * kBlock, v, mask);
        }
}

// acc[m][b] over rows m < MT of x and blocks b < NT.
template <int MT, int NT>
TARGET_F32 static void tile_f32(const float* x, int64_t x_stride, const float* w, int64_t K, float* out,
                                int64_t out_stride, const float* bias, __mmask16 last_mask) {
    __m512 acc[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int b = 0; b < NT; ++b) acc[m][b] = _mm512_setzero_ps();
    const int64_t block_stride = K * kBlock;
    for (int64_t k = 0; k < K; ++k) {
        __m512 wv[NT];
        for (int b = 0; b < NT; ++b) wv[b] = _mm512_loadu_ps(w + b * block_stride + k * kBlock);
        for (int m = 0; m < MT; ++m) {
            __m512 xv = _mm512_set1_ps(x[m * x_stride + k]);
            for (int b = 0; b < NT; ++b) acc[m][b] = _mm512_fmadd_ps(xv, wv[b], acc[m][b]);
        }
    }
    store_tile<MT, NT>(acc, out, out_stride, bias, last_mask);
}

template <int MT, int NT>
TARGET_BF16 static void tile_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t K,
                                  uint16_t* out, int64_t out_stride, const float* bias, __mmask16 last_mask) {
    __m512 acc[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int b = 0; b < NT; ++b) acc[m][b] = _mm512_setzero_ps();
    const int64_t pairs = K / 2;
    const int64_t block_stride = pairs * 2 * kBlock;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh wv[NT];
        for (int b = 0; b < NT; ++b)
            wv[b] = (__m512bh)_mm512_loadu_si512((const void*)(w + b * block_stride + p * 2 * kBlock));
        for (int m = 0; m < MT; ++m) {
            int32_t pair;
            std::memcpy(&pair, x + m * x_stride + 2 * p, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int b = 0; b < NT; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);
        }
    }
    store_tile<MT, NT>(acc, out, out_stride, bias, last_mask);
}

// A column of MT rows x 1 block, with a software prefetch kPrefetchBytes ahead in the weight stream.
template <int MT>
TARGET_F32 static void tall_f32(const float* x, int64_t x_stride, const float* w, int64_t K, float* out,
                                int64_t out_stride, const float* bias, __mmask16 last_mask) {
    __m512 acc[MT][1];
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch((const char*)(w + k * kBlock) + kPrefetchBytes, _MM_HINT_T0);
        const __m512 wv = _mm512_loadu_ps(w + k * kBlock);
        for (int m = 0; m < MT; ++m)
            acc[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * x_stride + k]), wv, acc[m][0]);
    }
    store_tile<MT, 1>(acc, out, out_stride, bias, last_mask);
}

template <int MT>
TARGET_BF16 static void tall_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t K,
                                  uint16_t* out, int64_t out_stride, const float* bias, __mmask16 last_mask) {
    __m512 acc[MT][1];
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_setzero_ps();
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; ++p) {
        _mm_prefetch((const char*)(w + p * 2 * kBlock) + kPrefetchBytes, _MM_HINT_T0);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + p * 2 * kBlock));
        for (int m = 0; m < MT; ++m) {
            int32_t pair;
            std::memcpy(&pair, x + m * x_stride + 2 * p, 4);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_set1_epi32(pair), wv);
        }
    }
    store_tile<MT, 1>(acc, out, out_stride, bias, last_mask);
}

template <typename T>
using TileFn = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t, const float*, __mmask16);

static const TileFn<float> kTilesF32[4][4] = {
    {tile_f32<1, 1>, tile_f32<1, 2>, tile_f32<1, 3>, tile_f32<1, 4>},
    {tile_f32<2, 1>, tile_f32<2, 2>, tile_f32<2, 3>, tile_f32<2, 4>},
    {tile_f32<3, 1>, tile_f32<3, 2>, tile_f32<3, 3>, tile_f32<3, 4>},
    {tile_f32<4, 1>, tile_f32<4, 2>, tile_f32<4, 3>, tile_f32<4, 4>}};
static const TileFn<uint16_t> kTilesBF16[4][4] = {
    {tile_bf16<1, 1>, tile_bf16<1, 2>, tile_bf16<1, 3>, tile_bf16<1, 4>},
    {tile_bf16<2, 1>, tile_bf16<2, 2>, tile_bf16<2, 3>, tile_bf16<2, 4>},
    {tile_bf16<3, 1>, tile_bf16<3, 2>, tile_bf16<3, 3>, tile_bf16<3, 4>},
    {tile_bf16<4, 1>, tile_bf16<4, 2>, tile_bf16<4, 3>, tile_bf16<4, 4>}};

static const TileFn<float> kTallF32[kTallRows] = {
    tall_f32<1>, tall_f32<2>, tall_f32<3>, tall_f32<4>, tall_f32<5>, tall_f32<6>, tall_f32<7>, tall_f32<8>,
    tall_f32<9>, tall_f32<10>, tall_f32<11>, tall_f32<12>, tall_f32<13>, tall_f32<14>, tall_f32<15>, tall_f32<16>};
static const TileFn<uint16_t> kTallBF16[kTallRows] = {
    tall_bf16<1>, tall_bf16<2>, tall_bf16<3>, tall_bf16<4>, tall_bf16<5>, tall_bf16<6>, tall_bf16<7>,
    tall_bf16<8>, tall_bf16<9>, tall_bf16<10>, tall_bf16<11>, tall_bf16<12>, tall_bf16<13>, tall_bf16<14>,
    tall_bf16<15>, tall_bf16<16>};

// out[M, N] = x[M, K] @ W^T (+ bias); W packed as nblocks blocks of 16 outputs.
template <typename T>
static void gemm(const TileFn<T> (*tiles)[4], const TileFn<T>* tall, const T* x, int64_t M, int64_t K,
                 int64_t x_stride, const T* w, int64_t N, const float* bias, T* out, int64_t out_stride,
                 int num_threads) {
    const int64_t nblocks = (N + kBlock - 1) / kBlock;
    const int64_t block_elems = K * kBlock;  // the same for both layouts (K/2 pairs x 16 x 2)
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, nblocks));
    #pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t b_begin = nblocks * tid / nth, b_end = nblocks * (tid + 1) / nth;
        if (M >= kTallMinM && M <= kTallMaxM) {
            // one sweep over this thread's blocks; the weight stream is contiguous, so the prefetch runs on
            // from one block into the next
            for (int64_t b = b_begin; b < b_end; ++b) {
                const int64_t n0 = b * kBlock;
                const int64_t tail = std::min<int64_t>(kBlock, N - n0);
                const __mmask16 last_mask = (__mmask16)((1u << tail) - 1u);
                for (int64_t m = 0; m < M; m += kTallRows) {
                    const int mt = (int)std::min<int64_t>(kTallRows, M - m);
                    tall[mt - 1](x + m * x_stride, x_stride, w + b * block_elems, K, out + m * out_stride + n0,
                                 out_stride, bias ? bias + n0 : nullptr, last_mask);
                }
            }
        } else {
            for (int64_t m0 = 0; m0 < M; m0 += kRowsPerChunk) {
                const int64_t m_end = std::min(M, m0 + kRowsPerChunk);
                for (int64_t b = b_begin; b < b_end; b += 4) {
                    const int nt = (int)std::min<int64_t>(4, b_end - b);
                    const int64_t n0 = b * kBlock;
                    const int64_t tail = std::min<int64_t>(kBlock, N - (b + nt - 1) * kBlock);
                    const __mmask16 last_mask = (__mmask16)((1u << tail) - 1u);
                    for (int64_t m = m0; m < m_end; m += 4) {
                        const int mt = (int)std::min<int64_t>(4, m_end - m);
                        tiles[mt - 1][nt - 1](x + m * x_stride, x_stride, w + b * block_elems, K,
                                              out + m * out_stride + n0, out_stride, bias ? bias + n0 : nullptr,
                                              last_mask);
                    }
                }
            }
        }
    }
}

void packed_linear(DType dtype, const void* x, int64_t M, int64_t K, int64_t x_stride, const void* w, int64_t N,
                   const float* bias, void* out, int64_t out_stride, int64_t num_threads) {
    if (dtype == DType::kFloat32)
        gemm<float>(kTilesF32, kTallF32, (const float*)x, M, K, x_stride, (const float*)w, N, bias, (float*)out,
                    out_stride, (int)num_threads);
    else
        gemm<uint16_t>(kTilesBF16, kTallBF16, (const uint16_t*)x, M, K, x_stride, (const uint16_t*)w, N, bias,
                       (uint16_t*)out, out_stride, (int)num_threads);
}

}  // namespace fxllm_cpu
