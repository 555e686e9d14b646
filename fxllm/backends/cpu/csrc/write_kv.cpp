// The cache write of fxllm::paged_attention: replaces the reference's masked index_copy (three nonzero
// calls per layer).
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace fxllm_cpu {

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

void write_kv(DType dtype, const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
              int64_t num_tokens, int64_t k_stride, int64_t v_stride, int64_t k_row, int64_t v_row) {
    if (dtype == DType::kFloat32)
        write_rows((const float*)k, (const float*)v, (float*)k_cache, (float*)v_cache, slots, num_tokens, k_stride,
                   v_stride, k_row, v_row);
    else
        write_rows((const uint16_t*)k, (const uint16_t*)v, (uint16_t*)k_cache, (uint16_t*)v_cache, slots,
                   num_tokens, k_stride, v_stride, k_row, v_row);
}

}  // namespace fxllm_cpu
