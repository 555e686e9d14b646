// fxllm_cpu::packed_linear, fxllm_cpu::paged_attention and fxllm_cpu::argmax_rows: the kernels of this folder as
// PyTorch ops, so a compiled graph's call reaches them through the dispatcher without entering Python (~2 us a
// call; ~6 us through the Python op machinery).
//
// packed_linear and paged_attention have the schemas of the canonical fxllm:: ops (fxllm/ops/), namespace aside,
// so the lowering pass can swap one for the other; like the canonical op, paged_attention writes the caches in
// place without declaring it (see fxllm/ops/paged_attention.py). Inputs a kernel does not take (float16,
// float64, non-contiguous caches, a CPU without AVX-512 for packed_linear) go to the canonical op, whose kernel
// is the plain-torch reference. Fake (meta) implementations are registered from Python when the library loads
// (fxllm/backends/cpu/native.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernels.h"

namespace fxllm_cpu {
namespace {

Isa g_isa;  // set once at load by set_isa (from fxllm/backends/cpu/isa.py); plain loops until then

// Called by native.py right after loading, and by tests that run the plain loops on an AVX-512 machine.
void set_isa(bool avx512, bool avx512_bf16) {
    g_isa.avx512 = avx512;
    g_isa.avx512_bf16 = avx512 && avx512_bf16;
}

std::optional<DType> kernel_dtype(at::ScalarType t) {
    if (t == at::kFloat) return DType::kFloat32;
    if (t == at::kBFloat16) return DType::kBFloat16;
    return std::nullopt;
}

at::Tensor packed_linear_reference(const at::Tensor& x, const at::Tensor& w, const c10::SymInt& out_features,
                                   const std::optional<at::Tensor>& bias) {
    static auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("fxllm::packed_linear", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, const std::optional<at::Tensor>&)>();
    return op.call(x, w, out_features, bias).contiguous();
}

at::Tensor packed_linear_op(const at::Tensor& x_in, const at::Tensor& w, c10::SymInt out_features,
                         const std::optional<at::Tensor>& bias) {
    const std::optional<DType> dtype = kernel_dtype(x_in.scalar_type());
    const bool runs = dtype == DType::kFloat32 ? g_isa.avx512 : (dtype == DType::kBFloat16 && g_isa.avx512_bf16);
    if (!runs || w.scalar_type() != x_in.scalar_type() || !w.is_contiguous() || !x_in.is_cpu())
        return packed_linear_reference(x_in, w, out_features, bias);
    const int64_t n = out_features.expect_int();
    const at::Tensor x = x_in.contiguous();
    const int64_t k = x.size(-1);
    TORCH_CHECK(w.numel() == (n + 15) / 16 * 16 * k, "fxllm_cpu::packed_linear: a packed weight of ", w.sizes(),
                " does not hold ", n, " x ", k, " weights; pack it with fxllm.ops.linear.pack_linear_weight");
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = n;
    at::Tensor out = at::empty(sizes, x.options());
    at::Tensor bias_values;
    if (bias.has_value()) bias_values = bias->to(at::kFloat).contiguous();
    const int64_t rows = k > 0 ? x.numel() / k : 0;
    if (rows > 0)
        fxllm_cpu::packed_linear(*dtype, x.data_ptr(), rows, k, k, w.data_ptr(), n,
                                 bias.has_value() ? bias_values.data_ptr<float>() : nullptr, out.data_ptr(), n,
                                 at::get_num_threads());
    return out;
}

// [T, H, D] whose rows may be strided (a slice of a fused QKV) but whose heads are contiguous.
at::Tensor inner_contiguous(const at::Tensor& t) {
    return t.stride(-1) == 1 && t.stride(-2) == t.size(-1) ? t : t.contiguous();
}

at::Tensor paged_attention_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, c10::SymInt sliding_window,
                           double softcap, const std::optional<at::Tensor>& sinks,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
    const at::ScalarType t = k_cache.scalar_type();
    const std::optional<DType> dtype = kernel_dtype(t);
    // FP8 caches (and any cache with scales) are the reference's: the lowering does not pick this kernel
    // for them (fxllm/backends/cpu/__init__.py), and a direct call still gets the right answer.
    if (!dtype || k_scale.has_value() || v_scale.has_value() || q_in.scalar_type() != t || k_in.scalar_type() != t || v_in.scalar_type() != t ||
        v_cache.scalar_type() != t || !k_cache.is_contiguous() || !v_cache.is_contiguous() || !q_in.is_cpu()) {
        static auto op = c10::Dispatcher::singleton()
            .findSchemaOrThrow("fxllm::paged_attention", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, c10::SymInt, double, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
        return op.call(q_in, k_in, v_in, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
                       scale, sliding_window, softcap, sinks, k_scale, v_scale)
            .contiguous();
    }
    const at::Tensor k = inner_contiguous(k_in), v = inner_contiguous(v_in), q = inner_contiguous(q_in);
    const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
    const int64_t k_row = k.size(1) * k.size(2), v_row = v.size(1) * v.size(2);
    write_kv(*dtype, k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr<int64_t>(),
             slots.size(0), k.stride(0), v.stride(0), k_row, v_row);
    const int64_t num_heads = q.size(1), head_dim = q.size(2), head_dim_v = v.size(-1);
    at::Tensor out = at::empty({q.size(0), num_heads, head_dim_v}, q.options());
    const at::Tensor tables = block_tables.to(at::kInt).contiguous();
    const at::Tensor lens = seq_lens.to(at::kInt).contiguous();
    const at::Tensor starts = query_start_loc.to(at::kInt).contiguous();
    at::Tensor sink_values;
    if (sinks.has_value()) sink_values = sinks->to(at::kFloat).contiguous();
    AttentionArgs args{};
    args.q = q.data_ptr();
    args.k_cache = k_cache.data_ptr();
    args.v_cache = v_cache.data_ptr();
    args.block_tables = tables.data_ptr<int32_t>();
    args.seq_lens = lens.data_ptr<int32_t>();
    args.query_start_loc = starts.data_ptr<int32_t>();
    args.out = out.data_ptr();
    args.sinks = sinks.has_value() ? sink_values.data_ptr<float>() : nullptr;
    args.num_seqs = seq_lens.size(0);
    args.num_tokens = q.size(0);
    args.num_heads = num_heads;
    args.num_kv_heads = k_cache.size(2);
    args.head_dim = head_dim;
    args.head_dim_v = head_dim_v;
    args.block_size = k_cache.size(1);
    args.q_stride = q.stride(0);
    args.table_stride = tables.stride(0);
    args.scale = static_cast<float>(scale);
    args.window = sliding_window.expect_int();
    args.softcap = static_cast<float>(softcap);
    args.num_threads = at::get_num_threads();
    fxllm_cpu::paged_attention(*dtype, args, g_isa);
    return out;
}

at::Tensor argmax_rows_op(const at::Tensor& logits) {
    const std::optional<DType> dtype = kernel_dtype(logits.scalar_type());
    TORCH_CHECK(dtype && logits.dim() == 2 && logits.stride(1) == 1,
                "fxllm_cpu::argmax_rows takes 2-D float32 or bfloat16 logits with contiguous rows, got ",
                logits.scalar_type(), " of shape ", logits.sizes(), " and strides ", logits.strides(),
                "; use torch.argmax for others");
    at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
    fxllm_cpu::argmax_rows(*dtype, logits.data_ptr(), logits.size(0), logits.size(1), logits.stride(0),
                           out.data_ptr<int64_t>(), at::get_num_threads(), g_isa);
    return out;
}

}  // namespace
}  // namespace fxllm_cpu

TORCH_LIBRARY(fxllm_cpu, m) {
    m.set_python_module("fxllm.backends.cpu.native");
    m.def("packed_linear(Tensor x, Tensor packed_weight, SymInt out_features, Tensor? bias=None) -> Tensor",
          {at::Tag::pt2_compliant_tag});
    m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor slot_mapping, "
          "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, SymInt sliding_window=-1, "
          "float softcap=0., Tensor? sinks=None, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor",
          {at::Tag::pt2_compliant_tag});
    m.def("argmax_rows(Tensor logits) -> Tensor", {at::Tag::pt2_compliant_tag});
    m.def("set_isa(bool avx512, bool avx512_bf16) -> ()", &fxllm_cpu::set_isa);
}

TORCH_LIBRARY_IMPL(fxllm_cpu, CPU, m) {
    m.impl("packed_linear", TORCH_FN(fxllm_cpu::packed_linear_op));
    m.impl("paged_attention", TORCH_FN(fxllm_cpu::paged_attention_op));
    m.impl("argmax_rows", TORCH_FN(fxllm_cpu::argmax_rows_op));
}
