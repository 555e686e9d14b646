// exp for the softmax of the attention kernels, in plain arithmetic so loops over it vectorise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fxllm_cpu {

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

}  // namespace fxllm_cpu
