"""C++ source of fxllm's native CPU op kernels: the kernels of linear_cpp.py and kernels_cpp.py behind
ATen wrappers that register with PyTorch's dispatcher, so a compiled graph's call reaches the kernel
without entering Python (a call cost ~6 us through the Python op machinery, ~2 us this way).

Each kernel source keeps its own namespace (they all name their entry point `kernel`). Dtypes or
layouts a kernel does not take go to `fxllm_cpu_fallback::<op>`, the op's plain-torch reference,
registered from Python (native.py).
"""

from __future__ import annotations

from fxllm.backends.cpu.kernels_cpp import WRITE_KV_SOURCE, decode_source
from fxllm.backends.cpu.linear_cpp import LINEAR_SOURCE

_HEADERS = r"""
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
"""

_WRAPPERS = r"""
static bool g_linear_f32 = false, g_linear_bf16 = false;  // what this CPU runs (set by fxllm_native_configure)

static int64_t dtype_code(at::ScalarType t) {
    return t == at::kFloat ? 0 : (t == at::kBFloat16 ? 1 : -1);
}

static at::Tensor packed_linear_cpu(const at::Tensor& x_in, const at::Tensor& w, c10::SymInt out_features,
                                    const std::optional<at::Tensor>& bias) {
    const int64_t code = dtype_code(x_in.scalar_type());
    const bool runs = code == 0 ? g_linear_f32 : (code == 1 && g_linear_bf16);
    if (!runs || w.scalar_type() != x_in.scalar_type() || !w.is_contiguous() || !x_in.is_cpu()) {
        static auto fallback = c10::Dispatcher::singleton()
            .findSchemaOrThrow("fxllm_cpu_fallback::packed_linear", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, const std::optional<at::Tensor>&)>();
        return fallback.call(x_in, w, out_features, bias);
    }
    const int64_t n = out_features.expect_int();
    const at::Tensor x = x_in.contiguous();
    const int64_t k = x.size(-1);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = n;
    at::Tensor out = at::empty(sizes, x.options());
    at::Tensor bias_values;
    if (bias.has_value()) bias_values = bias->to(at::kFloat).contiguous();
    const int64_t rows = k > 0 ? x.numel() / k : 0;
    if (rows > 0)
        fxllm_linear::kernel(code, x.data_ptr(), rows, k, k, w.data_ptr(), n,
                             bias.has_value() ? bias_values.data_ptr<float>() : nullptr, bias.has_value(),
                             out.data_ptr(), n, at::get_num_threads());
    return out;
}

// [T, H, D] whose rows may be strided (a slice of a fused QKV) but whose heads are contiguous.
static at::Tensor inner_contiguous(const at::Tensor& t) {
    return t.stride(-1) == 1 && t.stride(-2) == t.size(-1) ? t : t.contiguous();
}

static at::Tensor paged_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                                      c10::SymInt sliding_window, double softcap,
                                      const std::optional<at::Tensor>& sinks) {
    const at::ScalarType t = k_cache.scalar_type();
    const int64_t code = dtype_code(t);
    if (code < 0 || q_in.scalar_type() != t || k_in.scalar_type() != t || v_in.scalar_type() != t ||
        v_cache.scalar_type() != t || !k_cache.is_contiguous() || !v_cache.is_contiguous() || !q_in.is_cpu()) {
        static auto fallback = c10::Dispatcher::singleton()
            .findSchemaOrThrow("fxllm_cpu_fallback::paged_attention", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, c10::SymInt, double, const std::optional<at::Tensor>&)>();
        return fallback.call(q_in, k_in, v_in, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                             query_start_loc, scale, sliding_window, softcap, sinks);
    }
    const at::Tensor k = inner_contiguous(k_in), v = inner_contiguous(v_in), q = inner_contiguous(q_in);
    const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
    const int64_t k_row = k.size(1) * k.size(2), v_row = v.size(1) * v.size(2);
    fxllm_write_kv::kernel(code, k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           slots.data_ptr<int64_t>(), slots.size(0), k.stride(0), v.stride(0), k_row, v_row);
    const int64_t num_heads = q.size(1), head_dim = q.size(2), head_dim_v = v.size(-1);
    at::Tensor out = at::empty({q.size(0), num_heads, head_dim_v}, q.options());
    const at::Tensor tables = block_tables.to(at::kInt).contiguous();
    const at::Tensor lens = seq_lens.to(at::kInt).contiguous();
    const at::Tensor starts = query_start_loc.to(at::kInt).contiguous();
    at::Tensor sink_values;
    if (sinks.has_value()) sink_values = sinks->to(at::kFloat).contiguous();
    fxllm_attention::kernel(code, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr<int32_t>(),
                            lens.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), out.data_ptr(),
                            sinks.has_value() ? sink_values.data_ptr<float>() : nullptr, sinks.has_value(),
                            seq_lens.size(0), q.size(0), num_heads, k_cache.size(2), head_dim, head_dim_v,
                            k_cache.size(1), q.stride(0), tables.stride(0), (float)scale,
                            sliding_window.expect_int(), (float)softcap, at::get_num_threads());
    return out;
}

#define TARGET_AVX512_ARGMAX __attribute__((target("avx512f,avx512bw,avx512vl")))
static bool g_avx512 = false;

// Row-wise argmax of float32 (code 0) or bfloat16 (code 1) logits, first index of the maximum like torch.argmax;
// a NaN counts as the maximum (torch's rule), so a row with a NaN returns its first NaN.
TARGET_AVX512_ARGMAX static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TARGET_AVX512_ARGMAX static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) {
    uint32_t bits = uint32_t(*p) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

template <typename T>
TARGET_AVX512_ARGMAX static int64_t argmax_row(const T* x, int64_t n) {
    int64_t i = 0;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = load16(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, v);
    }
    float best = _mm512_reduce_max_ps(vmax);
    for (int64_t j = i; j < n; ++j) {
        float v = load1(x + j);
        if (v != v) nan = 1;
        best = v > best ? v : best;
    }
    if (nan) {
        for (int64_t j = 0; j < n; ++j) {
            float v = load1(x + j);
            if (v != v) return j;
        }
    }
    const __m512 vbest = _mm512_set1_ps(best);
    for (i = 0; i + 16 <= n; i += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), vbest, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    for (; i < n; ++i)
        if (load1(x + i) == best) return i;
    return 0;  // n == 0 or an all -inf row ends above; unreachable otherwise
}

template <typename T>
static int64_t argmax_row_generic(const T* x, int64_t n) {
    int64_t best_i = 0;
    float best = n > 0 ? load1(x) : 0.f;
    for (int64_t j = 0; j < n; ++j) {
        const float v = load1(x + j);
        if (v != v) return j;
        if (v > best) { best = v; best_i = j; }
    }
    return best_i;
}

template <typename T>
static void argmax_rows(const T* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t* out, int64_t threads) {
    #pragma omp parallel for num_threads(rows > 1 ? threads : 1)
    for (int64_t r = 0; r < rows; ++r)
        out[r] = g_avx512 ? argmax_row(x + r * row_stride, cols) : argmax_row_generic(x + r * row_stride, cols);
}

extern "C" void fxllm_argmax_rows(int64_t dtype, const void* x, int64_t rows, int64_t cols, int64_t row_stride,
                                  int64_t* out, int64_t threads) {
    if (dtype == 0) argmax_rows((const float*)x, rows, cols, row_stride, out, threads);
    else argmax_rows((const uint16_t*)x, rows, cols, row_stride, out, threads);
}

// One torch::Library per installed op: destroying it removes the kernel and restores whatever the
// dispatcher had before (the op's reference), so bind_op_backends can switch backends back and forth.
static std::map<std::string, std::unique_ptr<torch::Library>> g_installed;

extern "C" void fxllm_native_configure(int64_t avx512, int64_t avx512_bf16) {
    g_avx512 = avx512 != 0;
    g_linear_f32 = g_avx512;
    g_linear_bf16 = g_avx512 && avx512_bf16 != 0;
}

extern "C" int64_t fxllm_native_install(const char* op_name) {
    const std::string op(op_name);
    if (g_installed.count(op)) return 1;
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "fxllm", c10::DispatchKey::CPU, __FILE__,
                                                __LINE__);
    if (op == "packed_linear") lib->impl("packed_linear", TORCH_FN(packed_linear_cpu));
    else if (op == "paged_attention") lib->impl("paged_attention", TORCH_FN(paged_attention_cpu));
    else return 0;
    g_installed[op] = std::move(lib);
    return 1;
}

extern "C" void fxllm_native_uninstall(const char* op_name) { g_installed.erase(std::string(op_name)); }
"""


def native_source(avx512: bool, avx512_bf16: bool) -> str:
    """The whole translation unit: headers first (the kernel sources' own includes are then no-ops
    inside their namespaces), each kernel in its namespace, then the ATen wrappers."""
    return (
        _HEADERS
        + "namespace fxllm_linear {\n" + LINEAR_SOURCE + "\n}  // namespace fxllm_linear\n"
        + "namespace fxllm_write_kv {\n" + WRITE_KV_SOURCE + "\n}  // namespace fxllm_write_kv\n"
        + "namespace fxllm_attention {\n" + decode_source(avx512, avx512_bf16) + "\n}  // namespace fxllm_attention\n"
        + _WRAPPERS
    )  # fmt: skip
