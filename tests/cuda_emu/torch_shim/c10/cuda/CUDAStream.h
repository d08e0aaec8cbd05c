// Stands in for torch's c10/cuda/CUDAStream.h when csrc/binding.cpp is built for the CPU emulator
// (binding_emu.cpp): the emulated launches run at once, on the calling thread, and ignore the stream.
#pragma once

#include <cuda_runtime.h>

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
