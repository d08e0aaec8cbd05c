// csrc/binding.cpp itself, built for CPU tensors over the emulated kernels (tests/cuda_emulator.py,
// register_cpu_ops): the ops layer's `cuda` backend then runs the binding's own C++ (argument checks,
// allocations, workspaces, partial sums, dtype mapping) on a machine without a GPU.
//
// What differs from the GPU build, all of it here and in torch_shim/ (nothing in csrc/ knows):
//   * is_cuda() reads is_cpu() and the ops register for the CPU dispatch key;
//   * c10::cuda's guard and stream are empty stand-ins (torch_shim/; a CPU torch has no c10_cuda);
//   * the CUDA runtime calls the binding makes go to the emulator by name (a CUDA build of torch on a
//     machine without a GPU has loaded the real runtime, whose symbols would otherwise win);
//   * every kernel launch records the path it runs (emu_take_ran_paths) and turns an emulator fault
//     into an error that names it.
#include <Python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adapter.h"
#include "norm.h"

extern "C" {
const char* emu_error_string(int e);  // harness.cpp
int emu_last_error();
const char* emu_take_fault();
}

namespace {

std::vector<std::string>& ran_paths() {
  static std::vector<std::string> paths;
  return paths;
}

// After a launch: records "op:path" (when there is a path) and raises the emulator's fault, if any.
cudaError_t recorded(const char* op, const std::string& path, cudaError_t err) {
  if (!path.empty()) ran_paths().push_back(std::string(op) + ":" + path);
  const std::string fault = emu_take_fault();
  TORCH_CHECK(fault.empty(), "mmfast_cuda: ", op, " ", path, ": emulator fault: ", fault);
  return err;
}

}  // namespace

// The kernels' interface as binding.cpp sees it (mmfast:: is renamed to this below): the launches record
// their paths; everything else is csrc's.
namespace mmfast_recorded {
using namespace mmfast;

inline cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t s) {
  const std::string path = norm_fwd_path(p);
  return recorded("norm_fwd", path, mmfast::norm_fwd(p, s));
}
inline cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t s) {
  const std::string path = norm_bwd_path(p);
  return recorded("norm_bwd", path, mmfast::norm_bwd(p, s));
}
inline cudaError_t adapter_fwd(const AdapterFwdParams& p, cudaStream_t s) {
  const std::string path = adapter_fwd_path(p);
  return recorded("adapter_fwd", path, mmfast::adapter_fwd(p, s));
}
inline cudaError_t adapter_bwd(const AdapterBwdParams& p, cudaStream_t s) {
  const std::string path = adapter_bwd_path(p);
  return recorded("adapter_bwd", path, mmfast::adapter_bwd(p, s));
}
inline cudaError_t norm_sum_partials(const float* part, int64_t P, int64_t N, void* out, DType dt, cudaStream_t s) {
  return recorded("sum_partials", "", mmfast::norm_sum_partials(part, P, N, out, dt, s));
}
inline cudaError_t adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p, int8_t* out, cudaStream_t s) {
  return recorded("adapter_keep_mask", "", mmfast::adapter_keep_mask(seed, M, R, p, out, s));
}

}  // namespace mmfast_recorded

#define mmfast mmfast_recorded
#define is_cuda is_cpu
#define CUDA CPU
#define cudaGetErrorString(e) emu_error_string(e)
#define cudaGetLastError() static_cast<cudaError_t>(emu_last_error())
#include "binding.cpp"
#undef mmfast
#undef is_cuda
#undef CUDA
#undef cudaGetErrorString
#undef cudaGetLastError

// The paths launched since the last call, one per line, oldest first; clears them.
extern "C" const char* emu_take_ran_paths() {
  static std::string out;
  out.clear();
  for (const std::string& p : ran_paths()) out += p + "\n";
  ran_paths().clear();
  return out.c_str();
}
