// Python bindings of the C++ launch path: the only file here that knows Python.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "driver_api.hpp"
#include "grouped_mm_launch.hpp"
#include "launch_table.hpp"

namespace py = pybind11;

namespace {

using SlotTuple = std::tuple<int64_t, int64_t, int64_t>;  // (source, bytes, value)

mtmm::LaunchPlan make_plan(uint64_t function, int64_t block_x, int64_t shared_bytes,
                           int64_t scratch_bytes, int64_t grid_fixed, int64_t block_m,
                           int64_t block_n, int64_t grid_cap,
                           const std::vector<SlotTuple>& slots) {
  TORCH_CHECK(block_x > 0 && shared_bytes >= 0 && scratch_bytes >= 0, "bad launch plan");
  TORCH_CHECK(grid_fixed > 0 || (block_m > 0 && block_n > 0 && grid_cap > 0),
              "a launch plan needs a fixed grid or its tile sizes");
  TORCH_CHECK(slots.size() <= 62, "too many kernel parameters: ", slots.size());
  mtmm::LaunchPlan plan;
  plan.function = function;
  plan.block_x = static_cast<uint32_t>(block_x);
  plan.shared_bytes = static_cast<uint32_t>(shared_bytes);
  plan.scratch_bytes = scratch_bytes;
  plan.grid_fixed = grid_fixed;
  plan.block_m = block_m;
  plan.block_n = block_n;
  plan.grid_cap = grid_cap;
  for (const auto& [source, bytes, value] : slots) {
    TORCH_CHECK(source >= mtmm::ParamSlot::kFixed && source < 7, "bad slot source ", source);
    TORCH_CHECK(bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8, "bad slot size ", bytes);
    plan.slots.push_back({static_cast<int8_t>(source), static_cast<uint8_t>(bytes), value});
  }
  return plan;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtmm's C++ launch path for the grouped GEMM (mtmm_kernels/_cpp_launch.py)";

  m.def("grouped_mm", &mtmm::grouped_mm, py::arg("x"), py::arg("w"), py::arg("offsets"),
        py::arg("bias") = py::none(), py::arg("perm") = py::none(), py::arg("autograd") = true,
        "grouped_mm through the planned launches (rows gathered through perm where given), "
        "differentiable with autograd; None when a plan is missing");

  m.def("grouped_mm_dw", &mtmm::grouped_mm_dw, py::arg("x"), py::arg("dy"),
        py::arg("offsets"), py::arg("perm"), py::arg("need_bias"),
        "(dW, dBias) through the planned launch; None when the plan is missing");

  m.def(
      "register_mm",
      [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
         const at::Tensor& offsets, const std::optional<at::Tensor>& perm, uint64_t function,
         int64_t block_x, int64_t shared_bytes, int64_t scratch_bytes, int64_t block_m,
         int64_t block_n, int64_t grid_cap, const std::vector<SlotTuple>& slots) {
        auto key = mtmm::mm_key(x.device(), x.size(0), x.size(1), w.size(2), w.size(0),
                                mtmm::operand(x), mtmm::operand(w),
                                mtmm::operand(bias.value_or(at::Tensor())),
                                mtmm::operand(offsets),
                                mtmm::operand(perm.value_or(at::Tensor())));
        mtmm::plan_table().put(key, make_plan(function, block_x, shared_bytes, scratch_bytes,
                                              0, block_m, block_n, grid_cap, slots));
      },
      "Store the forward/dX kernel's plan for calls shaped like (x, w, bias, offsets, perm)");

  m.def(
      "register_dw",
      [](const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets,
         const std::optional<at::Tensor>& perm, bool need_bias, uint64_t function,
         int64_t block_x, int64_t shared_bytes, int64_t scratch_bytes, int64_t grid,
         const std::vector<SlotTuple>& slots) {
        auto key = mtmm::dw_key(x.device(), x.size(0), x.size(1), dy.size(1), offsets.size(0),
                                mtmm::operand(x), mtmm::operand(dy), mtmm::operand(offsets),
                                mtmm::operand(perm.value_or(at::Tensor())), need_bias);
        mtmm::plan_table().put(key, make_plan(function, block_x, shared_bytes, scratch_bytes,
                                              grid, 0, 0, 0, slots));
      },
      "Store the dW kernel's plan for calls shaped like (x, dy, offsets, perm, need_bias)");

  m.def("clear", [] { mtmm::plan_table().clear(); }, "Forget every plan");
  m.def("size", [] { return mtmm::plan_table().size(); }, "Number of plans");

  m.def("set_backward_fallback", [](py::function fallback) {
    // Held for the life of the process: no Python object is released after the interpreter.
    auto* held = new py::function(std::move(fallback));
    mtmm::set_backward_fallback(
        [held](const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
               const at::Tensor& perm, const at::Tensor& dy, bool need_x, bool need_w,
               bool need_b) {
          py::gil_scoped_acquire gil;
          py::object perm_or_none = perm.defined() ? py::cast(perm) : py::none();
          auto out = (*held)(x, w, offsets, perm_or_none, dy, need_x, need_w, need_b);
          using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                                   std::optional<at::Tensor>>;
          auto [dx, dw, db] = out.cast<Grads>();
          return std::make_tuple(dx.value_or(at::Tensor()), dw.value_or(at::Tensor()),
                                 db.value_or(at::Tensor()));
        });
  }, "The Python backward the C++ one calls when a plan is missing");

  m.def("launch_count", &mtmm::launch_count, "Launches made so far, dry runs included");
  m.def("set_stream_resolver", [](py::function resolver) {
    auto* held = new py::function(std::move(resolver));  // for the life of the process
    mtmm::set_stream_resolver([held](int64_t device_index, int64_t stream_id) {
      py::gil_scoped_acquire gil;
      return (*held)(device_index, stream_id).cast<uint64_t>();
    });
  }, "(device index, stream id) -> CUstream, for torch without c10::Stream::native_handle");
  m.def("stream_handle_from_resolver", &mtmm::stream_handle_from_resolver,
        "The resolver's answer, asked once per (device index, stream id)");
  m.def("current_stream_handle", &mtmm::current_stream_handle, py::arg("device"),
        py::arg("through_resolver") = false,
        "The CUstream launches on this device go to (or as the resolver finds it)");
  m.def("set_dry_run", &mtmm::set_dry_run, py::arg("on"), py::arg("log") = true,
        "Log launches (or only count them) instead of sending them to a GPU");
  m.def("take_launch_log", [] {
    py::list out;
    for (const auto& r : mtmm::take_launch_log()) {
      py::list params;
      for (const auto& p : r.params) params.append(py::bytes(
          reinterpret_cast<const char*>(p.data()), p.size()));
      out.append(py::make_tuple(r.function, r.grid_x, r.block_x, r.shared_bytes, r.stream,
                                params, r.scratch_bytes));
    }
    return out;
  }, "The dry-run launches since the last call: (function, grid, block, shared bytes, "
     "stream, [parameter bytes], scratch bytes)");
}
