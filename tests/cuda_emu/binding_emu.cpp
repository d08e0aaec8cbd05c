// csrc/binding.cpp itself, built for CPU tensors over the emulated kernels (tests/cuda_emulator.py,
// register_cpu_ops): the ops layer's `cuda` backend then runs the binding's own C++ (argument checks,
// allocations, workspaces, partial sums, dtype mapping) on a machine without a GPU.
//
// What differs from the GPU build, all of it here and in torch_shim/ (nothing in csrc/ knows):
//   * is_cuda() reads is_cpu(), and the ops register for the CPU dispatch key;
//   * c10::cuda's guard and stream are stand-ins (torch_shim/; a CPU torch has no c10_cuda): the guard
//     takes CPU devices only, the stream is ignored (emulated launches run at once);
//   * the CUDA runtime calls the binding makes go to the emulator by name (a CUDA build of torch on a
//     machine without a GPU has loaded the real runtime, whose symbols would otherwise win; the build
//     fails if the library still needs any cuda* symbol);
//   * while an op runs, CPU allocations (outputs, workspaces, widened weights) come from the emulator's
//     fenced buffers: filled with NaN bytes and ending at a guarded page, so an element never written
//     reaches the outputs as NaN and an access past a buffer's end during a launch is a fault;
//   * the op's tensor inputs are copied into fenced buffers too before the binding sees them: same sizes
//     and strides, the same address modulo 16 (the kernels' vector paths depend on it), NaN bytes in
//     the gaps between strided rows and fewer than 16 bytes from the last element to the guard page, so a
//     kernel reading past an input's rows faults, and one reading the padding between them gets NaN;
//   * every kernel launch checks that each pointer it gets lies in a fenced buffer (a pointer that
//     escaped both is an error), records the path it ran (emu_take_ran_paths) and turns an emulator
//     fault into an error that names it.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/Allocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adapter.h"
#include "norm.h"

extern "C" {  // harness.cpp
const char* emu_error_string(int e);
int emu_last_error();
const char* emu_take_fault();
void* emu_alloc_fenced(int64_t bytes, int align);
void emu_free_fenced(void* data);
int emu_in_fence(const void* p);
}

namespace {

std::vector<std::string>& ran_paths() {
  static std::vector<std::string> paths;
  return paths;
}

// After a launch: raises the emulator's fault, if any, and records "op:path" (when there is a path).
cudaError_t recorded(const char* op, const std::string& path, cudaError_t err) {
  const std::string fault = emu_take_fault();
  TORCH_CHECK(fault.empty(), "mmfast_cuda: ", op, " ", path, ": emulator fault: ", fault);
  if (err == cudaSuccess && !path.empty()) ran_paths().push_back(std::string(op) + ":" + path);
  return err;
}

void free_fenced(void* data) {
  if (data != nullptr) emu_free_fenced(data);
}

struct FencedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n == 0 ? nullptr : emu_alloc_fenced(static_cast<int64_t>(n), 16);
    TORCH_CHECK(n == 0 || p != nullptr, "mmfast_cuda (emulated): fenced allocation of ", n, " bytes failed");
    return {p, p, &free_fenced, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_fenced; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

// The CPU allocator is the fenced one for the scope's lifetime (set and restored at the top priority,
// which torch's own registration never uses).
struct FencedScope {
  static constexpr uint8_t kPriority = 255;
  c10::Allocator* const previous = c10::GetAllocator(c10::DeviceType::CPU);
  FencedScope() {
    static FencedAllocator fenced;
    c10::SetAllocator(c10::DeviceType::CPU, &fenced, kPriority);
  }
  ~FencedScope() { c10::SetAllocator(c10::DeviceType::CPU, previous, kPriority); }
  FencedScope(const FencedScope&) = delete;
  FencedScope& operator=(const FencedScope&) = delete;
};

// A copy of an input tensor in a fenced buffer (see the header); one whose rows share memory (stride 0,
// as autograd's gradient of a sum over rows) is copied byte for byte, overlap included. The buffer is allocated byte-exact
// (alignment 1) and its size chosen so that the copy's first element sits at the caller's address
// modulo 16; that leaves fewer than 16 bytes, NaN-filled, between the last element and the guard.
at::Tensor fenced_input(const at::Tensor& t) {
  if (!t.defined() || !t.is_cpu() || t.numel() == 0) return t;
  const int64_t extent = static_cast<int64_t>(
      at::detail::computeStorageNbytes(t.sizes(), t.strides(), static_cast<size_t>(t.element_size())));
  const int64_t residue = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16);
  // the data starts at guard - bytes, and the guard is page-aligned: bytes = -residue (mod 16)
  const int64_t bytes = extent + (((16 - residue) % 16 - extent % 16) + 16) % 16;
  void* data = emu_alloc_fenced(bytes, 1);
  TORCH_CHECK(data != nullptr, "mmfast_cuda (emulated): fenced allocation of ", bytes, " bytes failed");
  at::Tensor copy = at::from_blob(data, t.sizes(), t.strides(), &free_fenced, t.options());
  if (at::has_internal_overlap(t) == at::MemOverlap::Yes)  // broadcast rows (stride 0): copy_ refuses them
    std::memcpy(data, t.data_ptr(), static_cast<size_t>(extent));
  else
    copy.copy_(t);
  return copy;
}
std::optional<at::Tensor> fenced_input(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return fenced_input(*t);
}
template <typename T>
const T& fenced_input(const T& v) {  // scalars, dtypes, strings
  return v;
}

// Takes the place of the torch::Library in binding.cpp's TORCH_LIBRARY_IMPL block: each op it registers
// runs inside a FencedScope, on fenced copies of its tensor inputs (no op mutates or returns an input:
// the schemas say so).
struct FencedImpls {
  torch::Library& lib;
  template <typename R, typename... A>
  FencedImpls& impl(const char* name, R (*fn)(A...)) {
    lib.impl(name, [fn](A... args) -> R {
      FencedScope scope;
      return fn(fenced_input(args)...);
    });
    return *this;
  }
};

// Every pointer a launch gets (nullptr: not given) must lie in a fenced buffer: an input the guard
// above missed, or memory from outside the op, would otherwise be read unguarded.
void check_fenced(const char* op, std::initializer_list<const void*> pointers) {
  int i = 0;
  for (const void* q : pointers) {
    TORCH_CHECK(q == nullptr || emu_in_fence(q), "mmfast_cuda (emulated): ", op, ": pointer argument ", i,
                " lies outside every fenced buffer");
    ++i;
  }
}
void check_fenced(const mmfast::NormFwdParams& p) {
  check_fenced("norm_fwd", {p.x, p.residual, p.weight, p.bias, p.y, p.residual_out, p.mean, p.rstd});
}
void check_fenced(const mmfast::NormBwdParams& p) {
  check_fenced("norm_bwd", {p.dy, p.x, p.weight, p.mean, p.rstd, p.dres, p.dx, p.dw_partial, p.db_partial});
}
void check_fenced(const mmfast::AdapterFwdParams& p) {
  check_fenced("adapter_fwd", {p.x, p.down_w, p.down_b, p.up_w, p.up_b, p.mix, p.seed, p.y, p.z});
}
void check_fenced(const mmfast::AdapterBwdParams& p) {
  check_fenced("adapter_bwd", {p.dy, p.x, p.z, p.down_w, p.up_w, p.up_b, p.mix, p.seed, p.dx, p.dz, p.zd,
                               p.dmix_rows, p.da_partial, p.du_partial, p.dc_partial});
}

}  // namespace

// The kernels' interface as binding.cpp sees it (mmfast:: is renamed to this below). Names are brought
// in one by one, so a launch the binding starts calling that is not wrapped here fails to compile
// instead of running unrecorded.
namespace mmfast_recorded {
using mmfast::AdapterBwdParams;
using mmfast::AdapterFwdParams;
using mmfast::AdapterShape;
using mmfast::DType;
using mmfast::kAdapterMaxExperts;
using mmfast::kAdapterMaxHidden;
using mmfast::kMaxBwdStages;
using mmfast::NormBwdParams;
using mmfast::NormFwdParams;
// queries (nothing launched)
using mmfast::adapter_bwd_num_partials;
using mmfast::adapter_bwd_path;
using mmfast::adapter_fwd_path;
using mmfast::adapter_supported;
using mmfast::norm_bwd_num_partials;
using mmfast::norm_bwd_path;
using mmfast::norm_fwd_path;

// launches
template <typename P>
cudaError_t launched(const char* op, const P& p, const char* (*path)(const P&),
                     cudaError_t (*launch)(const P&, cudaStream_t), cudaStream_t s) {
  const std::string name = path(p);  // before the launch: the path the parameters select
  check_fenced(p);
  return recorded(op, name, launch(p, s));
}
inline cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t s) {
  return launched("norm_fwd", p, &mmfast::norm_fwd_path, &mmfast::norm_fwd, s);
}
inline cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t s) {
  return launched("norm_bwd", p, &mmfast::norm_bwd_path, &mmfast::norm_bwd, s);
}
inline cudaError_t adapter_fwd(const AdapterFwdParams& p, cudaStream_t s) {
  return launched("adapter_fwd", p, &mmfast::adapter_fwd_path, &mmfast::adapter_fwd, s);
}
inline cudaError_t adapter_bwd(const AdapterBwdParams& p, cudaStream_t s) {
  return launched("adapter_bwd", p, &mmfast::adapter_bwd_path, &mmfast::adapter_bwd, s);
}
inline cudaError_t norm_sum_partials(float* part, int64_t P, int64_t N, void* out, DType dt, cudaStream_t s) {
  check_fenced("sum_partials", {part, out});
  return recorded("sum_partials", "", mmfast::norm_sum_partials(part, P, N, out, dt, s));
}
inline cudaError_t adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p, int8_t* out, cudaStream_t s) {
  check_fenced("adapter_keep_mask", {seed, out});
  return recorded("adapter_keep_mask", "", mmfast::adapter_keep_mask(seed, M, R, p, out, s));
}

}  // namespace mmfast_recorded

#pragma push_macro("TORCH_LIBRARY_IMPL")
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) static void binding_impls(FencedImpls& m)
#define mmfast mmfast_recorded
#define is_cuda is_cpu
#define cudaGetErrorString(e) emu_error_string(e)
#define cudaGetLastError() static_cast<cudaError_t>(emu_last_error())
#include "binding.cpp"
#undef mmfast
#undef is_cuda
#undef cudaGetErrorString
#undef cudaGetLastError
#undef TORCH_LIBRARY_IMPL
#pragma pop_macro("TORCH_LIBRARY_IMPL")

TORCH_LIBRARY_IMPL(mmfast_cuda, CPU, m) {
  FencedImpls impls{m};
  binding_impls(impls);
}

// The paths launched since the last call, one per line, oldest first; clears them.
extern "C" const char* emu_take_ran_paths() {
  static std::string out;
  out.clear();
  for (const std::string& p : ran_paths()) out += p + "\n";
  ran_paths().clear();
  return out.c_str();
}

// For the tests of the input guard itself: the fenced copy an op's tensor input becomes.
TORCH_LIBRARY(mmfast_cuda_emu, m) {
  m.def("fenced_input(Tensor x) -> Tensor");
  m.impl("fenced_input", c10::DispatchKey::CPU, [](const at::Tensor& x) { return fenced_input(x); });
}
