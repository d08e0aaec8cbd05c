// Stands in for torch's c10/cuda/CUDAGuard.h when csrc/binding.cpp is built for the CPU emulator
// (binding_emu.cpp): a CPU build of torch has no c10_cuda library, and the emulated kernels have one device.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace c10::cuda
