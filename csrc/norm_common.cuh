// Shared pieces of the norm kernels: dtype conversion, vector access, row reductions, and the one
// place where launch configurations are chosen (used by the forward, the backward and the path names).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "norm.h"

// Kernel launches and dynamic shared memory go through these two macros so that the tests' CPU emulator
// (tests/cuda_emu, which defines them first) can run the same sources; for nvcc they are the plain syntax.
#ifndef MMFAST_LAUNCH
#define MMFAST_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
#ifndef MMFAST_DYNAMIC_SHARED
#define MMFAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace mmfast {
namespace detail {

// ------------------------------------------------------------------------------------------------
// dtype conversion (round to nearest even on the way down, as torch does)
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ------------------------------------------------------------------------------------------------
// vector access: VEC consecutive elements, as 16-byte transactions whenever VEC * sizeof(E) allows
// (callers guarantee 16-byte alignment then), element by element otherwise. Plain (coherent) loads:
// the wide kernels read back what the same thread wrote earlier in the kernel.
// ------------------------------------------------------------------------------------------------

template <typename E, int VEC>
__device__ __forceinline__ void load_vec(const E* p, E (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(E));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(E));
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + c * kPer);
      const E* e = reinterpret_cast<const E*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[c * kPer + k] = e[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = p[k];
  }
}

template <typename E, int VEC>
__device__ __forceinline__ void load_vec_f32(const E* p, float (&out)[VEC]) {
  E raw[VEC];
  load_vec<E, VEC>(p, raw);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_f32(raw[k]);
}

template <typename E, int VEC>
__device__ __forceinline__ void store_vec(E* p, const E (&v)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(E));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(E));
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      uint4 raw;
      E* e = reinterpret_cast<E*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) e[k] = v[c * kPer + k];
      *reinterpret_cast<uint4*>(p + c * kPer) = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = v[k];
  }
}

// Weight / bias element k of a unit: 1 (or 0) when absent.
template <typename W, int VEC>
__device__ __forceinline__ void load_affine(const W* p, int64_t off, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load_vec_f32<W, VEC>(p + off, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = fill;
  }
}

// ------------------------------------------------------------------------------------------------
// reductions over the TPR threads of a row. Butterfly shuffles leave the same bits in every lane
// (each step adds the same two numbers in every lane, and fp addition commutes); the cross-warp
// step sums the warps in a fixed order. All threads of the block must call it (uniform control).
// ------------------------------------------------------------------------------------------------

template <int K>
__device__ __forceinline__ void warp_allreduce(float (&v)[K]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
}

// red: shared memory of at least (rows per block) * (TPR / 32) * K floats.
template <int TPR, int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K], float* red, int row_in_block, int lane) {
  static_assert(TPR % 32 == 0, "rows are spread over whole warps");
  warp_allreduce<K>(v);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int w = lane / 32;
    if ((lane & 31) == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) red[(row_in_block * kWarps + w) * K + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < kWarps; ++j) s += red[(row_in_block * kWarps + j) * K + k];
      v[k] = s;
    }
    __syncthreads();
  }
}

// Same for a whole block of runtime size (the wide kernels: one row per block, blockDim.x % 32 == 0).
template <int K>
__device__ __forceinline__ void block_allreduce(float (&v)[K], float* red /* >= 32 * K floats */) {
  warp_allreduce<K>(v);
  const int warps = blockDim.x / 32;
  const int w = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[w * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int j = 0; j < warps; ++j) s += red[j * K + k];
    v[k] = s;
  }
  __syncthreads();
}

// Chan et al.'s merge of (count, mean, M2) moments.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

__device__ __forceinline__ Moments block_moments(Moments m, float* red /* >= 96 floats */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Moments o{__shfl_xor_sync(0xffffffffu, m.n, off), __shfl_xor_sync(0xffffffffu, m.mean, off),
              __shfl_xor_sync(0xffffffffu, m.m2, off)};
    // merge in lane order so that both partners compute the same bits
    m = ((threadIdx.x & off) == 0) ? merge(m, o) : merge(o, m);
  }
  const int warps = blockDim.x / 32;
  const int w = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
    red[3 * w] = m.n;
    red[3 * w + 1] = m.mean;
    red[3 * w + 2] = m.m2;
  }
  __syncthreads();
  Moments acc{red[0], red[1], red[2]};
  for (int j = 1; j < warps; ++j) acc = merge(acc, Moments{red[3 * j], red[3 * j + 1], red[3 * j + 2]});
  __syncthreads();
  return acc;
}

// ------------------------------------------------------------------------------------------------
// launch configurations: the one place they are chosen
// ------------------------------------------------------------------------------------------------

// Threads of the block of the wide (looping) kernels, one row per block.
constexpr int kWideThreads = 512;
// Items (vectors) per thread of the register kernels' generic configurations.
constexpr int kRegItems = 4;
// Rows a backward program handles at least before another program is added (small M).
constexpr int kMinRowsPerProgram = 4;
// Most resident blocks per SM a persistent backward launches.
constexpr int kMaxBlocksPerSm = 4;

enum class Path : int { kSpecial = 0, kRegister = 1, kWide = 2 };

struct Config {
  Path path;
  int vec;    // elements per vector access (16 bytes of the activation dtype, or 1)
  int tpr;    // threads per row (register paths)
  int items;  // vectors per thread (register paths)
  int n_ct;   // compile-time row length (kSpecial), else 0
};

// Rows per block of a register kernel: blocks of at least 128 threads.
__host__ __device__ constexpr int rows_per_block(int tpr) { return tpr < 128 ? 128 / tpr : 1; }
__host__ __device__ constexpr int block_threads(int tpr) { return tpr < 128 ? 128 : tpr; }

// Where a thread of a register kernel sits: its row slot in the block and lane in the row, and the row
// length in VEC-element units (compile-time for the special widths, whose rows fill the threads exactly).
template <int VEC, int TPR, int ITEMS, int N_CT>
struct RowGeometry {
  static constexpr int kRows = rows_per_block(TPR);
  static constexpr bool kFull = N_CT > 0 && (N_CT / VEC) == TPR * ITEMS;
  int row_in_block, lane;
  int64_t N, units;
  float inv_n;

  __device__ explicit RowGeometry(int64_t n)
      : row_in_block(threadIdx.x / TPR),
        lane(threadIdx.x % TPR),
        N(N_CT > 0 ? N_CT : n),
        units((N_CT > 0 ? N_CT : n) / VEC),
        inv_n(1.f / static_cast<float>(N_CT > 0 ? N_CT : n)) {}
  // Vector index of this thread's i-th item, and whether it lies inside the row.
  __device__ int64_t unit(int i) const { return static_cast<int64_t>(i) * TPR + lane; }
  __device__ bool inside(int64_t u) const { return kFull || u < units; }
};

// Items and threads per row of a specialised width: exact fits, no predicates.
__host__ __device__ constexpr int spec_items(int units) {
  return units % 5 == 0 ? 5 : (units % 3 == 0 ? 3 : 4);
}
__host__ __device__ constexpr int spec_tpr(int units) { return units / spec_items(units); }

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Whether p (nullptr counts as aligned) is a multiple of `bytes` (a power of two).
inline bool aligned_to(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

// The widths with their own compile-time instances.
constexpr int kSpecialWidths[] = {768, 1024, 1280, 4096, 5120, 8192};

// The backward holds x, dy and the fp32 dweight/dbias partials per element, so its generic register
// kernels stop at 256 threads per row (up to 255 registers per thread); the forward goes to 512. The
// special widths keep their exact fit (fp32 at 8192: 512 threads, 16 elements each).
inline Config choose_config(int64_t N, DType act, bool vec_ok, bool backward) {
  const int v = 16 / dtype_size(act);
  const int max_tpr = backward ? 256 : 512;
  if (vec_ok) {
    for (int w : kSpecialWidths) {
      if (N == w) return {Path::kSpecial, v, spec_tpr(w / v), spec_items(w / v), w};
    }
    const int64_t units = N / v;
    for (int tpr = 32; tpr <= max_tpr; tpr *= 2) {
      if (units <= static_cast<int64_t>(tpr) * kRegItems) return {Path::kRegister, v, tpr, kRegItems, 0};
    }
    return {Path::kWide, v, kWideThreads, 0, 0};
  }
  for (int tpr : {32, 128, max_tpr}) {
    if (N <= static_cast<int64_t>(tpr) * kRegItems) return {Path::kRegister, 1, tpr, kRegItems, 0};
  }
  return {Path::kWide, 1, kWideThreads, 0, 0};
}

// A human-readable name of a configuration (static storage).
const char* config_name(const Config& c);

// Streaming-multiprocessor count of the current device (cached per device).
int current_sm_count();

// Calls f(Tag<T>{}, Tag<W>{}, std::integral_constant<bool, RMS>{}) with T (activation) and W (weight)
// the CUDA types of (act, wdt) and RMS the norm kind. Unsupported pairs give cudaErrorInvalidValue.
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t dispatch_norm(DType act, DType wdt, bool rms, F&& f) {
  auto kind = [&](auto t, auto w) -> cudaError_t {
    return rms ? f(t, w, std::true_type{}) : f(t, w, std::false_type{});
  };
  if (act == DType::kFloat32 && wdt == DType::kFloat32) return kind(Tag<float>{}, Tag<float>{});
  if (act == DType::kFloat16 && wdt == DType::kFloat16) return kind(Tag<__half>{}, Tag<__half>{});
  if (act == DType::kFloat16 && wdt == DType::kFloat32) return kind(Tag<__half>{}, Tag<float>{});
  if (act == DType::kBFloat16 && wdt == DType::kBFloat16) return kind(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
  if (act == DType::kBFloat16 && wdt == DType::kFloat32) return kind(Tag<__nv_bfloat16>{}, Tag<float>{});
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace mmfast

