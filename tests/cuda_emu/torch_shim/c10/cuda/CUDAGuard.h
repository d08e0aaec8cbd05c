// Stands in for torch's c10/cuda/CUDAGuard.h when csrc/binding.cpp is built for the CPU emulator
// (binding_emu.cpp): a CPU build of torch has no c10_cuda library, and the emulated kernels have one
// device. Like the real guard, it refuses a device of another type (here: anything but the CPU).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "Expected a CPU device for the emulated kernels, but got: ", device);
  }
};

}  // namespace c10::cuda
