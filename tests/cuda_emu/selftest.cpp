// Small kernels that show the emulator's checks work: one correct kernel whose results depend on barriers,
// shuffles and cp.async doing what they should, and one kernel per fault the emulator must report.
#include <cstdint>

#include "cuda_emu.h"

namespace {

// out[t] = shared[(t + 1) % n] + (sum over the warp of t), with n = blockDim.x threads.
__global__ void good_kernel(float* out) {
  __shared__ float s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  float v = static_cast<float>(t);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * n + t] = s[(t + 1) % n] + v;
}

__global__ void divergent_barrier_kernel(float*) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
}

__global__ void split_warp_kernel(float* out) {
  float v = 1.f;
  if ((threadIdx.x & 31) < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// out[2t] = the staged value read before its wait (stale), out[2t + 1] = after it (the source's).
__global__ void cp_async_kernel(float* out, const float* src) {
  MMFAST_DYNAMIC_SHARED(uint4, stage);
  const int t = threadIdx.x;
  ::mmfast_emu::cp_async16(stage + t, src + 4 * t);
  ::mmfast_emu::cp_async_commit();
  out[2 * t] = reinterpret_cast<const float*>(stage + t)[0];
  ::mmfast_emu::cp_async_wait(0);
  out[2 * t + 1] = reinterpret_cast<const float*>(stage + t)[0];
}

__global__ void copies_in_flight_kernel(float*, const float* src) {
  MMFAST_DYNAMIC_SHARED(uint4, stage);
  ::mmfast_emu::cp_async16(stage + threadIdx.x, src + 4 * threadIdx.x);
  ::mmfast_emu::cp_async_commit();
}

// Two block sums through one shared array, with the barrier after the reads missing: out[t] and
// out[n + t] should be 32 and 3200 per warp; a warp that runs ahead overwrites red before a slower warp
// has read the first sum (a race on a GPU, which the emulator's warp-by-warp schedule makes certain).
__global__ void reuse_race_kernel(float* out) {
  __shared__ float red[32];
  const int t = threadIdx.x, n = blockDim.x, warps = n / 32;
  for (int round = 0; round < 2; ++round) {
    float v = round == 0 ? 1.f : 100.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((t & 31) == 0) red[t / 32] = v;
    __syncthreads();
    float sum = 0.f;
    for (int j = 0; j < warps; ++j) sum += red[j];
    out[round * n + t] = sum;
  }
}

// A 16-byte vector load from src + 1 float and a store to out + 2 floats (both misaligned when
// `store` picks it); the aligned access between them is fine.
__global__ void misaligned_vector_kernel(float* out, const float* src, bool store) {
  const uint4 ok = *reinterpret_cast<const uint4*>(src);
  *reinterpret_cast<uint4*>(out) = ok;
  if (store) {
    *reinterpret_cast<uint4*>(out + 2) = ok;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(src + 1);
    *reinterpret_cast<uint4*>(out + 4) = v;
  }
}

}  // namespace

// which: 0 good (2 blocks x 64 threads), 1 divergent barrier, 2 split warp (deadlock), 3 partial-warp
// shuffle, 4 cp.async (32 threads), 5 copies in flight at exit, 6 the shared-memory reuse race (1 block x
// 64 threads), 7 a misaligned 16-byte vector load, 8 a misaligned 16-byte vector store (1 thread each).
// Returns the launch's CUDA error.
extern "C" int emu_selftest(int which, float* out, const float* src) {
  cudaGetLastError();
  switch (which) {
    case 0: { auto k = good_kernel; MMFAST_LAUNCH(k, 2, 64, 0, nullptr)(out); break; }
    case 1: { auto k = divergent_barrier_kernel; MMFAST_LAUNCH(k, 1, 64, 0, nullptr)(out); break; }
    case 2: { auto k = split_warp_kernel; MMFAST_LAUNCH(k, 1, 32, 0, nullptr)(out); break; }
    case 3: { auto k = partial_warp_shuffle_kernel; MMFAST_LAUNCH(k, 1, 48, 0, nullptr)(out); break; }
    case 4: { auto k = cp_async_kernel; MMFAST_LAUNCH(k, 1, 32, 32 * 16, nullptr)(out, src); break; }
    case 5: { auto k = copies_in_flight_kernel; MMFAST_LAUNCH(k, 1, 32, 32 * 16, nullptr)(out, src); break; }
    case 6: { auto k = reuse_race_kernel; MMFAST_LAUNCH(k, 1, 64, 0, nullptr)(out); break; }
    case 7: { auto k = misaligned_vector_kernel; MMFAST_LAUNCH(k, 1, 1, 0, nullptr)(out, src, false); break; }
    case 8: { auto k = misaligned_vector_kernel; MMFAST_LAUNCH(k, 1, 1, 0, nullptr)(out, src, true); break; }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
