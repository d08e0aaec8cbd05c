// A CPU emulator for the CUDA C++ kernels in csrc/, for tests on machines without a GPU.
//
// The kernel sources are compiled by the host compiler as plain C++ with this header forced in front
// (-include) and MMFAST_CUDA_EMULATION defined. A launch runs the grid's blocks one after another; the
// threads of a block are fibers (ucontext) on one OS thread, switched at every barrier:
//
//   * __syncthreads():   all threads of the block meet; a thread that has already returned while others
//                        wait is reported (the barrier is not uniform), as is a deadlock;
//   * __shfl_xor_sync(): the 32 lanes of a warp meet and exchange values (full mask and full warps only;
//                        lanes meeting at different shuffles are reported);
//   * cp.async (the seam in norm_bwd.cu): a copy is performed as late as the program allows, at the
//                        cp.async.wait_group that retires its group, so a stage read before its wait sees
//                        stale bytes; copies still in flight when a thread returns are reported;
//   * warps run one after another, each through its own shuffles up to the next __syncthreads (ascending
//                        or descending, alternating by block and launch), so a warp that overwrites shared memory
//                        before a slower warp has read it always does so (a race on a GPU);
//   * __shared__ arrays are function statics (blocks never overlap; they keep their last values, so a read
//                        before a write is not caught); dynamic shared memory is filled with 0xFF bytes
//                        (NaN in every float format) before each block;
//   * a 16-byte vector load or store (uint4) at an address that is not a multiple of 16 is reported (a
//                        fault on a GPU; x86 does it as two 8-byte moves);
//   * alloc_fenced gives buffers that end at a PROT_NONE page: an access past the end faults (SIGSEGV is
//                        caught during launches and reported).
//
// The device is described by a small table (SM count, shared memory) selected with
// mmfast_emu::select_device, so that persistent grids walk several row groups per block at test sizes.
// Arithmetic is the host's: fmaf is a fused multiply-add like the GPU's, but nvcc also contracts plain
// a * b + c into FMAs where g++ here does not, and rsqrtf is 1/sqrtf (the GPU's is within 2 ulp), so
// results match the GPU's to rounding, not bitwise. What is not emulated: timing, concurrency between
// blocks, the memory model beyond program order, partial-warp masks, accesses before a buffer's start
// (caught only when the 64 bytes of NaN there reach an output), and anything a kernel does not use.
#pragma once

#define MMFAST_CUDA_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The CUDA headers define these for a host compile; the emulator's meanings replace theirs.
#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace mmfast_emu {

// ---- the running thread ------------------------------------------------------------------------------
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_block();
// Exchange 8 bytes with the lane `lane ^ lane_mask` of this thread's warp.
uint64_t shuffle_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width);
// Dynamic shared memory of the running launch.
void* dynamic_shared();

// cp.async: queue a 16-byte copy in this thread's open group; close the group; retire all but the newest
// `pending` closed groups (performing their copies now).
void cp_async16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending);

// ---- launches ----------------------------------------------------------------------------------------
// Runs body() as every thread of every block of the grid; returns the launch's error (a configuration
// error, or cudaErrorLaunchFailure when the emulator found a fault: see fault()).
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel_id, const std::function<void()>& body);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    // Kernel parameters are passed by value, as a launch copies them.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(grid, block, smem, reinterpret_cast<const void*>(kernel),
             [&params, k]() { std::apply(k, params); });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launch<P...>{kernel, grid, block, smem};
}

// ---- emulator control (tests) ------------------------------------------------------------------------
struct DeviceProps {
  int sm_count;
  int smem_optin;   // most dynamic shared memory a block may opt into
  int smem_per_sm;  // for the occupancy estimate
};
// cp.async copies land at the wait that retires their group, or (eager) at issue.
void set_copy_mode(bool eager);
// `bytes` of memory (aligned to `align`, a power of two <= 16) that end less than `align` bytes before a
// PROT_NONE page and start at least 64 bytes into a mapping filled with 0xFF; an access to the page
// during a launch is a fault.
void* alloc_fenced(size_t bytes, size_t align);
size_t fenced_offset(const void* data);  // bytes from the mapping's start to data
bool in_fence(const void* p);             // p lies in a fenced buffer, between its data start and its guard
void free_fenced(void* data);
// Select device `dev` of the table; returns false for a bad index.
bool select_device(int dev);
// Device `dev`'s row of the table; returns false for a bad index.
bool device_props(int dev, DeviceProps* out);
// The first fault since the last call ("" when none), and clears it.
const char* take_fault();

// ---- 16-byte vector accesses ------------------------------------------------------------------------
// On the GPU a 16-byte load or store through uint4 must be 16-byte aligned (a misaligned one is a fault);
// x86 does it as two 8-byte moves whatever the address. In kernel sources uint4 is this type instead, whose
// copies report an address that is not a multiple of 16 as a fault of the running launch.
void vector_access(const void* p, bool store);
struct alignas(16) CheckedUint4 {
  unsigned int x, y, z, w;
  CheckedUint4() = default;
  CheckedUint4(const CheckedUint4& o) {
    vector_access(&o, false);
    std::memcpy(static_cast<void*>(this), static_cast<const void*>(&o), 16);
  }
  CheckedUint4& operator=(const CheckedUint4& o) {
    vector_access(&o, false);
    vector_access(this, true);
    std::memcpy(static_cast<void*>(this), static_cast<const void*>(&o), 16);
    return *this;
  }
};

}  // namespace mmfast_emu

#define uint4 ::mmfast_emu::CheckedUint4

#define threadIdx (::mmfast_emu::thread_idx())
#define blockIdx (::mmfast_emu::block_idx())
#define blockDim (::mmfast_emu::block_dim())
#define gridDim (::mmfast_emu::grid_dim())

#define MMFAST_LAUNCH(kernel, grid, block, smem, stream) ::mmfast_emu::launch(kernel, grid, block, smem, stream)
#define MMFAST_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::mmfast_emu::dynamic_shared())

inline void __syncthreads() { ::mmfast_emu::sync_block(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "the emulator shuffles up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ::mmfast_emu::shuffle_xor_bits(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// The typed overloads nvcc's cuda_runtime.h adds for kernels (a host compile sees only the void* ones).
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int block_size,
                                                                 size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                         dynamic_smem);
}
