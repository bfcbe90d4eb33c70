// Python bindings of the C++ launch path: the only file here that knows Python.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <initializer_list>
#include <tuple>
#include <vector>

#include "checks.hpp"
#include "driver_api.hpp"
#include "group_sort_launch.hpp"
#include "grouped_mm_launch.hpp"
#include "launch_table.hpp"
#include "public_calls.hpp"

namespace py = pybind11;

namespace {

using SlotTuple = std::tuple<int64_t, int64_t, int64_t>;  // (source, bytes, value)

// (function, block, shared bytes, scratch bytes per program, slots) of one compiled kernel.
using PlanFields = std::tuple<uint64_t, int64_t, int64_t, int64_t, std::vector<SlotTuple>>;

// A plan without its grid rule (the caller sets it).
mtmm::LaunchPlan plan_from(const PlanFields& fields) {
  const auto& [function, block_x, shared_bytes, scratch_bytes, slots] = fields;
  MTMM_CHECK(block_x > 0 && shared_bytes >= 0 && scratch_bytes >= 0, "bad launch plan");
  MTMM_CHECK(slots.size() <= 62, "too many kernel parameters: ", slots.size());
  mtmm::LaunchPlan plan;
  plan.function = function;
  plan.block_x = static_cast<uint32_t>(block_x);
  plan.shared_bytes = static_cast<uint32_t>(shared_bytes);
  plan.scratch_bytes = scratch_bytes;
  for (const auto& [source, bytes, value] : slots) {
    MTMM_CHECK(source >= mtmm::ParamSlot::kFixed && source < mtmm::kMaxCallValues,
               "bad slot source ", source);
    MTMM_CHECK(bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8, "bad slot size ", bytes);
    plan.slots.push_back({static_cast<int8_t>(source), static_cast<uint8_t>(bytes), value});
  }
  return plan;
}

// The tensor behind a Python object, or null for anything else (None included).
const at::Tensor* tensor_of(py::handle obj) {
  return THPVariable_Check(obj.ptr()) ? &THPVariable_Unpack(obj.ptr()) : nullptr;
}

// Whether the Python function must make this call: under a Python dispatch mode (such as
// FlopCounterMode, which must see the op), or with a tensor of a torch.func transform or of a
// Python subclass such as a fake tensor (no storage to launch on). Checked here, not in Python:
// a few nanoseconds on the host path instead of a few hundred.
bool python_must_call(std::initializer_list<const at::Tensor*> tensors) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return true;
  const c10::DispatchKeySet wrapped({c10::DispatchKey::Python,
                                     c10::DispatchKey::FuncTorchGradWrapper,
                                     c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::Batched});
  for (const at::Tensor* t : tensors) {
    if (t && t->key_set().has_any(wrapped)) return true;
  }
  return false;
}

// A public function's plain call from Python arguments of any kind: None where an argument is
// not a tensor (bias may be None), the Python function must make the call, or the C++ call
// does not take it.
template <typename Call>
py::object public_call(Call call, py::handle x, py::handle w, py::handle index,
                       py::handle bias) {
  const at::Tensor *x_t = tensor_of(x), *w_t = tensor_of(w), *index_t = tensor_of(index);
  const at::Tensor* bias_t = bias.is_none() ? nullptr : tensor_of(bias);
  if (!x_t || !w_t || !index_t || (!bias.is_none() && !bias_t)) return py::none();
  if (python_must_call({x_t, w_t, index_t, bias_t})) return py::none();
  std::optional<at::Tensor> y = call(*x_t, *w_t, *index_t,
                                     bias_t ? std::optional<at::Tensor>(*bias_t) : std::nullopt);
  return y ? py::cast(*y) : py::none();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtmm's C++ launch path for the grouped GEMM and its group sort "
            "(mtmm_kernels/_cpp_launch.py)";

  m.def("grouped_mm", &mtmm::grouped_mm, py::arg("x"), py::arg("w"), py::arg("offsets"),
        py::arg("bias") = py::none(), py::arg("perm") = py::none(), py::arg("autograd") = true,
        "grouped_mm through the planned launches (rows gathered through perm where given), "
        "differentiable with autograd; None when a plan is missing");

  m.def("grouped_mm_public", [](py::handle x, py::handle w, py::handle offsets,
                                py::handle bias) {
    return public_call(mtmm::grouped_mm_public, x, w, offsets, bias);
  }, "mtmm_kernels.grouped_mm's plain call, checked and launched here; None for any other");
  m.def("grouped_mm_by_ids_public", [](py::handle x, py::handle w, py::handle group_ids,
                                       py::handle bias) {
    return public_call(mtmm::grouped_mm_by_ids_public, x, w, group_ids, bias);
  }, "mtmm_kernels.grouped_mm_by_ids's plain call (group sort included); None for any other");

  m.def("grouped_mm_dw", &mtmm::grouped_mm_dw, py::arg("x"), py::arg("dy"),
        py::arg("offsets"), py::arg("perm"), py::arg("need_bias"),
        "(dW, dBias) through the planned launch; None when the plan is missing");

  m.def(
      "register_mm",
      [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
         const at::Tensor& offsets, const std::optional<at::Tensor>& perm,
         const PlanFields& fields, int64_t block_m, int64_t block_n, int64_t grid_cap) {
        MTMM_CHECK(block_m > 0 && block_n > 0 && grid_cap > 0, "bad grid rule");
        auto key = mtmm::mm_key(x.device(), x.size(0), x.size(1), w.size(2), w.size(0),
                                mtmm::operand(x), mtmm::operand(w),
                                mtmm::operand(bias.value_or(at::Tensor())),
                                mtmm::operand(offsets),
                                mtmm::operand(perm.value_or(at::Tensor())));
        mtmm::LaunchPlan plan = plan_from(fields);
        plan.block_m = block_m;
        plan.block_n = block_n;
        plan.grid_cap = grid_cap;
        mtmm::plan_table().put(key, std::move(plan));
      },
      "Store the forward/dX kernel's plan for calls shaped like (x, w, bias, offsets, perm)");

  m.def(
      "register_dw",
      [](const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets,
         const std::optional<at::Tensor>& perm, bool need_bias, const PlanFields& fields,
         int64_t grid) {
        MTMM_CHECK(grid > 0, "bad grid");
        auto key = mtmm::dw_key(x.device(), x.size(0), x.size(1), dy.size(1), offsets.size(0),
                                mtmm::operand(x), mtmm::operand(dy), mtmm::operand(offsets),
                                mtmm::operand(perm.value_or(at::Tensor())), need_bias);
        mtmm::LaunchPlan plan = plan_from(fields);
        plan.grid_fixed = grid;
        mtmm::plan_table().put(key, std::move(plan));
      },
      "Store the dW kernel's plan for calls shaped like (x, dy, offsets, perm, need_bias)");

  m.def("sort_by_group", &mtmm::sort_by_group, py::arg("ids"), py::arg("num_groups"),
        "(perm, offsets) of the group sort through its planned launches; None when a plan is "
        "missing");

  m.def(
      "register_sort",
      [](const at::Tensor& ids, int64_t G, const PlanFields& counts, const PlanFields& scatter,
         int64_t max_programs, int64_t row_step, int64_t block_g, int64_t block_p_cap,
         const std::tuple<int64_t, int64_t, int64_t>& python_split) {
        MTMM_CHECK(ids.dim() == 1 && ids.is_contiguous(), "the sort's ids must be contiguous");
        MTMM_CHECK(max_programs > 0 && row_step > 0 && block_g > G && block_p_cap > 0,
                   "bad row split");
        const int64_t T = ids.size(0);
        mtmm::LaunchPlan counts_plan = plan_from(counts);
        counts_plan.split = {max_programs, row_step, block_g, block_p_cap};
        const mtmm::SortSplit split = mtmm::sort_split(counts_plan.split, T);
        // The C++ rule must split as group_sort._launch_group_sort did for this call.
        const auto [rows, programs, block_p] = python_split;
        MTMM_CHECK(split.rows_per_program == rows && split.programs == programs &&
                      split.block_p == block_p,
                   "mtmm: the C++ row split (", split.rows_per_program, ", ", split.programs,
                   ", ", split.block_p, ") differs from the Python one (", rows, ", ",
                   programs, ", ", block_p, ")");
        const mtmm::Operand ids_key = mtmm::operand(ids);
        mtmm::plan_table().put(mtmm::sort_counts_key(ids.device(), T, G, ids_key),
                               std::move(counts_plan));
        mtmm::plan_table().put(mtmm::sort_scatter_key(ids.device(), T, G, ids_key, split),
                               plan_from(scatter));
      },
      "Store the group sort's two plans for calls shaped like (ids, G)");

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
  }, "The Python backward the C++ one calls when a plan is missing or under create_graph");

  m.def("set_launch_error_handler", [](py::function handler) {
    auto* held = new py::function(std::move(handler));  // for the life of the process
    mtmm::set_launch_error_handler([held](const std::string& message) {
      py::gil_scoped_acquire gil;
      (*held)(message);
    });
  }, "Called with the message of a launch error in the C++ backward (before its fallback)");
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
