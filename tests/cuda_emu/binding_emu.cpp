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
//     reaches the outputs as NaN and an access past a buffer's end during a launch is a fault. Inputs
//     are the caller's tensors, unguarded;
//   * every kernel launch records the path it ran (emu_take_ran_paths) and turns an emulator fault into
//     an error that names it.
#include <Python.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
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

// Takes the place of the torch::Library in binding.cpp's TORCH_LIBRARY_IMPL block: each op it registers
// runs inside a FencedScope.
struct FencedImpls {
  torch::Library& lib;
  template <typename R, typename... A>
  FencedImpls& impl(const char* name, R (*fn)(A...)) {
    lib.impl(name, [fn](A... args) -> R {
      FencedScope scope;
      return fn(args...);
    });
    return *this;
  }
};

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
inline cudaError_t norm_sum_partials(const float* part, int64_t P, int64_t N, void* out, DType dt, cudaStream_t s) {
  return recorded("sum_partials", "", mmfast::norm_sum_partials(part, P, N, out, dt, s));
}
inline cudaError_t adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p, int8_t* out, cudaStream_t s) {
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
