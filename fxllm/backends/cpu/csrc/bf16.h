// Scalar loads and stores of the kernels' element types, as float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace fxllm_cpu {

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

}  // namespace fxllm_cpu
