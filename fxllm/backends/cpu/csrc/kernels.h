// Entry points of fxllm's CPU kernels (one .cpp file each) as ops.cpp calls them. The kernels take raw
// pointers and sizes, so their files need no PyTorch headers and compile in about a second each.
#pragma once

#include <cstdint>

namespace fxllm_cpu {

// Element types the kernels read and write: float32, or bfloat16 stored as uint16 (computed in float32).
enum class DType : int64_t { kFloat32 = 0, kBFloat16 = 1 };

// The instruction sets whose fast paths may run; ops.cpp holds the one copy, set from Python at load
// (fxllm/backends/cpu/isa.py decides). Without AVX-512 the attention and argmax kernels run plain loops.
struct Isa {
    bool avx512 = false;
    bool avx512_bf16 = false;  // VDPBF16PS: bfloat16 dot products
};

// out[M, N] = x[M, K] @ W^T (+ bias) with W packed in blocks of 16 outputs (fxllm/ops/linear.py):
// float32 [N/16, K, 16], bfloat16 [N/16, K/2, 16, 2] (K even). Needs AVX-512 (bfloat16: AVX512-BF16);
// bias is float32 or nullptr.
void packed_linear(DType dtype, const void* x, int64_t M, int64_t K, int64_t x_stride, const void* w, int64_t N,
                   const float* bias, void* out, int64_t out_stride, int64_t num_threads);

// Copies row t of k/v ([T, row] with token strides k_stride/v_stride) to cache slot slots[t]; slots < 0
// (padding) are skipped.
void write_kv(DType dtype, const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
              int64_t num_tokens, int64_t k_stride, int64_t v_stride, int64_t k_row, int64_t v_row);

// The attention half of fxllm::paged_attention once this step's k/v are in the caches. Caches are
// [num_blocks, block_size, num_kv_heads, head_dim] and contiguous; q rows are q_stride apart with
// contiguous heads; out is [num_tokens, num_heads, head_dim_v], contiguous.
struct AttentionArgs {
    const void* q;
    const void* k_cache;
    const void* v_cache;
    const int32_t* block_tables;
    const int32_t* seq_lens;
    const int32_t* query_start_loc;
    void* out;
    const float* sinks;  // one logit per query head, or nullptr
    int64_t num_seqs, num_tokens, num_heads, num_kv_heads, head_dim, head_dim_v, block_size;
    int64_t q_stride, table_stride;
    float scale;
    int64_t window;  // sliding window; <= 0: none
    float softcap;   // <= 0: none
    int64_t num_threads;
};
void paged_attention(DType dtype, const AttentionArgs& args, const Isa& isa);

// out[r] = the index of row r's maximum (the first one; a NaN counts as the maximum, as in torch.argmax).
void argmax_rows(DType dtype, const void* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t* out,
                 int64_t num_threads, const Isa& isa);

}  // namespace fxllm_cpu
