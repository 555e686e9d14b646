// fxllm_cpu::onednn_linear(x, weight, bias): fxllm::linear through oneDNN over a packed copy of the weight, made
// on the first call with that weight and kept beside it (fxllm/backends/cpu/onednn_linear.py says why: the
// speed of Inductor's weight freezing without freezing, so the compiled graph stays cacheable). The graph passes
// the plain weight, like any weight; this file keeps weight -> packed copy. An entry is used only while its
// weight is the same live tensor at the same version (an in-place change packs again); entries of weights that
// died are dropped when the next one is packed. In C++ rather than Python: a compiled graph's call reaches it
// without entering Python (~2 us a call against ~6 us through the Python op machinery, ops.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <unordered_map>

namespace fxllm_cpu {
namespace {

// The row count oneDNN chooses the packed layout for (onednn_linear.py: BATCH_HINT).
int64_t g_batch_hint = 16;

struct Packed {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
    uint32_t version;
    at::Tensor packed;
};

std::mutex g_mutex;
std::unordered_map<const c10::TensorImpl*, Packed> g_packed;

at::Tensor pack(const at::Tensor& weight) {
    static auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
        .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
    return op.call(weight, g_batch_hint);
}

at::Tensor packed_weight(const at::Tensor& weight) {
    const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
    const uint32_t version = weight._version();
    std::lock_guard<std::mutex> guard(g_mutex);
    auto found = g_packed.find(key);
    if (found != g_packed.end()) {
        // The same address may hold a new tensor once the old one died: compare the live object, not the key.
        auto alive = found->second.weight.lock();
        if (alive.get() == key && found->second.version == version) return found->second.packed;
        g_packed.erase(found);
    }
    for (auto it = g_packed.begin(); it != g_packed.end();)  // drop the entries of weights that died
        it = it->second.weight.expired() ? g_packed.erase(it) : std::next(it);
    at::Tensor packed = pack(weight);
    g_packed.emplace(key, Packed{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                     weight.getIntrusivePtr()),
                                 version, packed});
    return packed;
}

at::Tensor onednn_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    static auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                          c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
    TORCH_CHECK(weight.dim() == 2, "fxllm_cpu::onednn_linear: a 2-D weight, got ", weight.sizes());
    return op.call(x, packed_weight(weight), bias, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// Weights packed and alive (tests and the start-up log read it).
int64_t onednn_linear_num_packed() {
    std::lock_guard<std::mutex> guard(g_mutex);
    int64_t alive = 0;
    for (const auto& entry : g_packed) alive += entry.second.weight.expired() ? 0 : 1;
    return alive;
}

void onednn_linear_set_batch_hint(int64_t rows) { g_batch_hint = rows; }

}  // namespace
}  // namespace fxllm_cpu

TORCH_LIBRARY_FRAGMENT(fxllm_cpu, m) {
    m.def("onednn_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", {at::Tag::pt2_compliant_tag});
    m.def("onednn_linear_num_packed() -> int", &fxllm_cpu::onednn_linear_num_packed);
    m.def("onednn_linear_set_batch_hint(int rows) -> ()", &fxllm_cpu::onednn_linear_set_batch_hint);
}

TORCH_LIBRARY_IMPL(fxllm_cpu, CPU, m) { m.impl("onednn_linear", TORCH_FN(fxllm_cpu::onednn_linear_op)); }
