// The fused Mixture-of-Modality adapter: forward, backward and the dropout mask (contract: adapter.h).
//
// Forward, one block per tile of kTileRows rows:
//   1. z: every thread walks its vectors of the row tile's columns once, keeping the tile's z partial
//      sums (kTileRows x kAdapterMaxHidden) in registers; a block reduction finishes them. One thread
//      per (row, hidden) writes z, draws the dropout mask and stores mix * zd for the tile in shared memory.
//   2. y: per group, every thread walks its vectors again (an L2 hit: the tile was just read), loads the
//      experts' weights of its columns once for all the tile's rows and writes y = x + s * sum(...).
// Backward:
//   rows kernel (tiles like the forward): T = dy ._G U_e (per group, registers, block reduction) and
//     dy . c_e; then d z = keep * s * sum_e mix_e T_e and d mix per row = s * (zd . T_e + dy . c_e).
//   column kernel (a persistent grid: column chunks x programs, each program a contiguous range of rows):
//     dx = dy + dz A, and the program's partial sums of dA = dz^T x, dU = s * (mix zd)^T dy and
//     dc = s * mix^T dy in registers, written once per program; norm_sum_partials sums them in order.
// No atomics: results are bit-identical run to run. Offsets are 64-bit.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "adapter.h"
#include "norm_common.cuh"

namespace mmfast {
namespace detail {

constexpr int kTileRows = 4;           // rows per block of the forward and the backward's rows kernel
constexpr int kRowThreadsMax = 128;    // threads of those blocks, at most (blockDim.x is a multiple of 32)
constexpr int kColThreads = 128;       // threads of the column kernel's blocks
constexpr int kColVec = 2;             // columns per thread of the column kernel (registers: dA, dU, dc)
constexpr int kProgramsPerSm = 8;      // column kernel: resident programs per SM it aims for
constexpr int RM = kAdapterMaxHidden;
constexpr int EM = kAdapterMaxExperts;
// One thread per (row, hidden channel) and per (row, expert) of a tile: a warp's worth at most.
static_assert(kTileRows * RM <= 32 && kTileRows * EM <= 32, "a row tile's hidden values must fit one warp");

struct Dims {
  int64_t M, S, D, DG;
  int R, E, G, RG;
  float scale, p_drop, keep_scale;
};

inline Dims dims(const AdapterShape& s) {
  return {s.M, s.S, s.D, s.D / s.G, s.R, s.E, s.G, s.R / s.G, s.scale, s.p_drop, s.p_drop > 0.f ? s.keep_scale : 1.f};
}

// ------------------------------------------------------------------------------------------------
// dropout: Philox 4x32 with 10 rounds, the stream the Triton kernels draw with tl.rand(seed, offset)
// ------------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Whether hidden activation `offset` (= row * R + j) is kept: uniform(seed, offset) >= p.
__device__ __forceinline__ bool keep_hidden(uint64_t seed, uint32_t offset, float p) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t v = static_cast<int32_t>(c0);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * 4.6566127342e-10f >= p;
}

// ------------------------------------------------------------------------------------------------
// shared pieces of the row-tile kernels
// ------------------------------------------------------------------------------------------------

// The tile's rows of a [M, D] activation at column vector d, in fp32 (0 past the last row).
template <typename T, int VEC>
__device__ __forceinline__ void load_tile(const T* __restrict__ p, int64_t stride, int64_t m0, int rows, int64_t d,
                                          float (&out)[kTileRows][VEC]) {
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) {
    if (r < rows) {
      load_vec_f32<T, VEC>(p + (m0 + r) * stride + d, out[r]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[r][v] = 0.f;
    }
  }
}

// The experts' up-projection at column vector d (inside one group): on_u(e, jl, u) with u = U_e[d.., jl]
// for every expert e and hidden channel jl of the group, then on_c(e, c) with c = c_e[d..]. e and jl are
// compile-time after unrolling, so the callbacks index register arrays statically.
template <int VEC, typename OnU, typename OnC>
__device__ __forceinline__ void for_up_weights(const float* __restrict__ U, const float* __restrict__ c, const Dims& s,
                                               int64_t d, OnU&& on_u, OnC&& on_c) {
#pragma unroll
  for (int e = 0; e < EM; ++e) {
    if (e < s.E) {
#pragma unroll
      for (int jl = 0; jl < RM; ++jl) {
        if (jl < s.RG) {
          float u[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) u[v] = U[(e * s.D + d + v) * s.RG + jl];
          on_u(e, jl, u);
        }
      }
      float cv[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) cv[v] = c[e * s.D + d + v];
      on_c(e, cv);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreadsMax)
    adapter_fwd_kernel(const T* __restrict__ x, int64_t stride_x, const float* __restrict__ A,
                       const float* __restrict__ a, const float* __restrict__ U, const float* __restrict__ c,
                       const float* __restrict__ mix, const int64_t* __restrict__ seed, T* __restrict__ y,
                       float* __restrict__ z, Dims s) {
  __shared__ float red[(kRowThreadsMax / 32) * kTileRows * RM];
  __shared__ float zt[kTileRows][RM];     // z of the tile (bias added)
  __shared__ float h[kTileRows][EM][RM];  // mix * zd
  __shared__ float w[kTileRows][EM];      // mix
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int rows = static_cast<int>(s.M - m0 < kTileRows ? s.M - m0 : kTileRows);
  const int64_t units = s.D / VEC;

  // 1. z = x A^T + a over the tile
  float acc[kTileRows * RM];
#pragma unroll
  for (int k = 0; k < kTileRows * RM; ++k) acc[k] = 0.f;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    const int64_t d = u * VEC;
    float xv[kTileRows][VEC];
    load_tile<T, VEC>(x, stride_x, m0, rows, d, xv);
#pragma unroll
    for (int j = 0; j < RM; ++j) {
      if (j < s.R) {
        float av[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) av[v] = A[j * s.D + d + v];
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r * RM + j] = fmaf(xv[r][v], av[v], acc[r * RM + j]);
        }
      }
    }
  }
  block_allreduce<kTileRows * RM>(acc, red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
      for (int j = 0; j < RM; ++j) zt[r][j] = j < s.R ? acc[r * RM + j] + a[j] : 0.f;
    }
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < kTileRows * s.R) {  // one thread per (row, hidden): z out, the mask, mix * zd (0 past the last row)
    const int r = t / s.R, j = t % s.R;
    const int64_t m = m0 + r;
    float zv = 0.f;
    if (r < rows) {
      zv = zt[r][j];
      z[m * s.R + j] = zv;
      if (s.p_drop > 0.f) {
        zv = keep_hidden(static_cast<uint64_t>(*seed), static_cast<uint32_t>(m * s.R + j), s.p_drop) ? zv * s.keep_scale
                                                                                                     : 0.f;
      }
    }
    for (int e = 0; e < s.E; ++e) h[r][e][j] = r < rows ? mix[(m / s.S) * s.E + e] * zv : 0.f;
  }
  if (t < kTileRows * s.E) {
    const int r = t / s.E, e = t % s.E;
    w[r][e] = r < rows ? mix[((m0 + r) / s.S) * s.E + e] : 0.f;
  }
  __syncthreads();

  // 2. y = x + s * sum_e (h_e ._G U_e^T + mix_e c_e), group by group
  const int64_t group_units = s.DG / VEC;
  for (int g = 0; g < s.G; ++g) {
    for (int64_t u = threadIdx.x; u < group_units; u += blockDim.x) {
      const int64_t d = g * s.DG + u * VEC;
      float out[kTileRows][VEC];
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[r][v] = 0.f;
      }
      for_up_weights<VEC>(
          U, c, s, d,
          [&](int e, int jl, const float (&uv)[VEC]) {
#pragma unroll
            for (int r = 0; r < kTileRows; ++r) {
              const float hv = h[r][e][g * s.RG + jl];
#pragma unroll
              for (int v = 0; v < VEC; ++v) out[r][v] = fmaf(hv, uv[v], out[r][v]);
            }
          },
          [&](int e, const float (&cv)[VEC]) {
#pragma unroll
            for (int r = 0; r < kTileRows; ++r) {
              const float wv = w[r][e];
#pragma unroll
              for (int v = 0; v < VEC; ++v) out[r][v] = fmaf(wv, cv[v], out[r][v]);
            }
          });
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
        if (r < rows) {
          float xv[VEC];
          load_vec_f32<T, VEC>(x + (m0 + r) * stride_x + d, xv);
          T yv[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) yv[v] = from_f32<T>(xv[v] + s.scale * out[r][v]);
          store_vec<T, VEC>(y + (m0 + r) * s.D + d, yv);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// backward: rows kernel
// ------------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreadsMax)
    adapter_bwd_rows_kernel(const T* __restrict__ dy, int64_t stride_dy, const float* __restrict__ z,
                            const float* __restrict__ U, const float* __restrict__ c, const float* __restrict__ mix,
                            const int64_t* __restrict__ seed, float* __restrict__ dz, float* __restrict__ zd_out,
                            float* __restrict__ dmix_rows, Dims s) {
  constexpr int K = kTileRows * EM * RM;
  __shared__ float red[(kRowThreadsMax / 32) * K];
  __shared__ float zt[kTileRows][RM];          // zd
  __shared__ float tt[kTileRows][EM][RM + 1];  // T (slot RM: dy . c_e)
  __shared__ float w[kTileRows][EM];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int rows = static_cast<int>(s.M - m0 < kTileRows ? s.M - m0 : kTileRows);
  const int t = threadIdx.x;

  bool keep = true;
  if (t < kTileRows * s.R) {  // zd of the tile (0 past the last row)
    const int r = t / s.R, j = t % s.R;
    const int64_t m = m0 + r;
    float zv = 0.f;
    if (r < rows) {
      zv = z[m * s.R + j];
      if (s.p_drop > 0.f) {
        keep = keep_hidden(static_cast<uint64_t>(*seed), static_cast<uint32_t>(m * s.R + j), s.p_drop);
        zv = keep ? zv * s.keep_scale : 0.f;
        if (zd_out != nullptr) zd_out[m * s.R + j] = zv;
      }
    }
    zt[r][j] = zv;
  }
  if (t < kTileRows * s.E) {
    const int r = t / s.E, e = t % s.E;
    w[r][e] = r < rows ? mix[((m0 + r) / s.S) * s.E + e] : 0.f;
  }

  float tb[kTileRows * EM];
#pragma unroll
  for (int k = 0; k < kTileRows * EM; ++k) tb[k] = 0.f;
  const int64_t group_units = s.DG / VEC;
  for (int g = 0; g < s.G; ++g) {
    float acc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = 0.f;
    for (int64_t u = threadIdx.x; u < group_units; u += blockDim.x) {
      const int64_t d = g * s.DG + u * VEC;
      float dv[kTileRows][VEC];
      load_tile<T, VEC>(dy, stride_dy, m0, rows, d, dv);
      for_up_weights<VEC>(
          U, c, s, d,
          [&](int e, int jl, const float (&uv)[VEC]) {
#pragma unroll
            for (int r = 0; r < kTileRows; ++r) {
              float& a = acc[(r * EM + e) * RM + jl];
#pragma unroll
              for (int v = 0; v < VEC; ++v) a = fmaf(dv[r][v], uv[v], a);
            }
          },
          [&](int e, const float (&cv)[VEC]) {
#pragma unroll
            for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) tb[r * EM + e] = fmaf(dv[r][v], cv[v], tb[r * EM + e]);
            }
          });
    }
    block_allreduce<K>(acc, red);
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
        for (int e = 0; e < EM; ++e) {
#pragma unroll
          for (int jl = 0; jl < RM; ++jl) {
            if (jl < s.RG) tt[r][e][g * s.RG + jl] = acc[(r * EM + e) * RM + jl];
          }
        }
      }
    }
  }
  block_allreduce<kTileRows * EM>(tb, red);
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
      for (int e = 0; e < EM; ++e) tt[r][e][RM] = tb[r * EM + e];
    }
  }
  __syncthreads();

  if (t < rows * s.R) {  // d z = keep * s * sum_e mix_e T_e
    const int r = t / s.R, j = t % s.R;
    float v = 0.f;
    for (int e = 0; e < s.E; ++e) v = fmaf(w[r][e], tt[r][e][j], v);
    v *= s.scale;
    if (s.p_drop > 0.f) v = keep ? v * s.keep_scale : 0.f;
    dz[(m0 + r) * s.R + j] = v;
  }
  if (t < rows * s.E) {  // d mix (per row) = s * (zd . T_e + dy . c_e)
    const int r = t / s.E, e = t % s.E;
    float v = tt[r][e][RM];
    for (int j = 0; j < s.R; ++j) v = fmaf(zt[r][j], tt[r][e][j], v);
    dmix_rows[(m0 + r) * s.E + e] = s.scale * v;
  }
}

// ------------------------------------------------------------------------------------------------
// backward: column kernel
// ------------------------------------------------------------------------------------------------

template <typename T, int VEC, bool NEED_DW>
__global__ void __launch_bounds__(kColThreads)
    adapter_bwd_cols_kernel(const T* __restrict__ x, int64_t stride_x, const T* __restrict__ dy, int64_t stride_dy,
                            const float* __restrict__ zd, const float* __restrict__ dz, const float* __restrict__ A,
                            const float* __restrict__ mix, T* __restrict__ dx, float* __restrict__ da_part,
                            float* __restrict__ du_part, float* __restrict__ dc_part, Dims s, int64_t rows_per_program) {
  const int64_t d = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (d >= s.D) return;  // no block-wide synchronisation below
  const int64_t g = d / s.DG;  // a vector never straddles groups (DG % VEC == 0)
  const int64_t p = blockIdx.y;
  const int64_t m_begin = p * rows_per_program;
  const int64_t m_end = m_begin + rows_per_program < s.M ? m_begin + rows_per_program : s.M;

  float av[RM][VEC];
#pragma unroll
  for (int j = 0; j < RM; ++j) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) av[j][v] = j < s.R ? A[j * s.D + d + v] : 0.f;
  }
  float da[RM][VEC], du[EM][RM][VEC], dc[EM][VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
#pragma unroll
    for (int j = 0; j < RM; ++j) da[j][v] = 0.f;
#pragma unroll
    for (int e = 0; e < EM; ++e) {
      dc[e][v] = 0.f;
#pragma unroll
      for (int jl = 0; jl < RM; ++jl) du[e][jl][v] = 0.f;
    }
  }

  for (int64_t m = m_begin; m < m_end; ++m) {
    float dyv[VEC];
    load_vec_f32<T, VEC>(dy + m * stride_dy + d, dyv);
    float dzr[RM];
#pragma unroll
    for (int j = 0; j < RM; ++j) dzr[j] = j < s.R ? dz[m * s.R + j] : 0.f;
    if (dx != nullptr) {
      T out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < RM; ++j) acc = fmaf(dzr[j], av[j][v], acc);
        out[v] = from_f32<T>(dyv[v] + acc);
      }
      store_vec<T, VEC>(dx + m * s.D + d, out);
    }
    if constexpr (NEED_DW) {
      float xv[VEC];
      load_vec_f32<T, VEC>(x + m * stride_x + d, xv);
#pragma unroll
      for (int j = 0; j < RM; ++j) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) da[j][v] = fmaf(dzr[j], xv[v], da[j][v]);
      }
      const int64_t b = m / s.S;
#pragma unroll
      for (int e = 0; e < EM; ++e) {
        if (e < s.E) {
          const float we = mix[b * s.E + e];
#pragma unroll
          for (int jl = 0; jl < RM; ++jl) {
            if (jl < s.RG) {
              const float hz = we * zd[m * s.R + g * s.RG + jl];
#pragma unroll
              for (int v = 0; v < VEC; ++v) du[e][jl][v] = fmaf(hz, dyv[v], du[e][jl][v]);
            }
          }
#pragma unroll
          for (int v = 0; v < VEC; ++v) dc[e][v] = fmaf(we, dyv[v], dc[e][v]);
        }
      }
    }
  }

  if constexpr (NEED_DW) {
    float* pa = da_part + p * s.R * s.D;
    float* pu = du_part + p * s.E * s.D * s.RG;
    float* pc = dc_part + p * s.E * s.D;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int j = 0; j < RM; ++j) {
        if (j < s.R) pa[j * s.D + d + v] = da[j][v];
      }
#pragma unroll
      for (int e = 0; e < EM; ++e) {
        if (e < s.E) {
#pragma unroll
          for (int jl = 0; jl < RM; ++jl) {
            if (jl < s.RG) pu[(e * s.D + d + v) * s.RG + jl] = s.scale * du[e][jl][v];
          }
          pc[e * s.D + d + v] = s.scale * dc[e][v];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(256) adapter_keep_mask_kernel(const int64_t* __restrict__ seed, int64_t count, int R,
                                                                float p, int8_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) out[i] = keep_hidden(static_cast<uint64_t>(*seed), static_cast<uint32_t>(i), p) ? 1 : 0;
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

// Columns per access: vec when every row of every activation tensor starts on a vec-element boundary
// and no access straddles a group; else 1.
inline int pick_vec(int vec, const AdapterShape& s, int elt, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  if (s.D % vec != 0 || (s.D / s.G) % vec != 0) return 1;
  for (const auto& r : rows) {
    if (!aligned_to(r.first, vec * elt) || r.second % vec != 0) return 1;
  }
  return vec;
}

// Threads of a row-tile block: enough that each thread's share of a group is a few vectors.
inline int row_threads(int64_t group_units) {
  int threads = 32;
  while (threads < kRowThreadsMax && static_cast<int64_t>(threads) * 4 < group_units) threads *= 2;
  return threads;
}

int fwd_vec(const AdapterFwdParams& p) {
  const int elt = dtype_size(p.act);
  return pick_vec(16 / elt, p.shape, elt, {{p.x, p.stride_x}, {p.y, p.shape.D}});
}

int rows_vec(const AdapterBwdParams& p) {
  const int elt = dtype_size(p.act);
  return pick_vec(16 / elt, p.shape, elt, {{p.dy, p.stride_dy}});
}

int cols_vec(const AdapterBwdParams& p) {  // x is read only for the weight gradients
  return pick_vec(kColVec, p.shape, dtype_size(p.act),
                  {{p.dy, p.stride_dy}, {p.need_dw ? p.x : nullptr, p.stride_x}, {p.need_dx ? p.dx : nullptr, p.shape.D}});
}

// Launches a row-tile kernel (the forward or the backward's rows kernel; `kernel` is its instance for
// vector width vec): one block per kTileRows rows, row_threads threads.
template <typename... P, typename... A>
cudaError_t launch_row_tiles(void (*kernel)(P...), int vec, const Dims& s, cudaStream_t stream, A&&... args) {
  const unsigned blocks = static_cast<unsigned>((s.M + kTileRows - 1) / kTileRows);
  MMFAST_LAUNCH(kernel, blocks, row_threads(s.DG / vec), 0, stream)(std::forward<A>(args)...);
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch_act(DType act, F&& f) {
  switch (act) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

int64_t col_chunks(int64_t D, int vec) {
  const int64_t per_block = static_cast<int64_t>(kColThreads) * vec;
  return (D + per_block - 1) / per_block;
}

int64_t num_programs(int64_t M, int64_t chunks) {
  if (M == 0) return 0;
  const int64_t target = (static_cast<int64_t>(kProgramsPerSm) * current_sm_count() + chunks - 1) / chunks;
  const int64_t most = (M + kMinRowsPerProgram - 1) / kMinRowsPerProgram;
  return target < 1 ? 1 : (target < most ? target : most);
}

}  // namespace detail

bool adapter_supported(const AdapterShape& s) {
  return s.R >= 1 && s.R <= kAdapterMaxHidden && s.E >= 1 && s.E <= kAdapterMaxExperts && s.G >= 1 &&
         s.R % s.G == 0 && s.D >= 1 && s.D % s.G == 0 && s.S >= 1 && s.M >= 0 && s.M * s.R < (int64_t{1} << 31) &&
         s.p_drop >= 0.f && s.p_drop < 1.f && (s.p_drop == 0.f || s.keep_scale >= 1.f);
}

cudaError_t adapter_fwd(const AdapterFwdParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!adapter_supported(p.shape) || (p.shape.p_drop > 0.f && p.seed == nullptr)) return cudaErrorInvalidValue;
  if (p.shape.M == 0) return cudaSuccess;
  const Dims s = dims(p.shape);
  return dispatch_act(p.act, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const int vec = fwd_vec(p);
    return launch_row_tiles(vec == kVec ? adapter_fwd_kernel<T, kVec> : adapter_fwd_kernel<T, 1>, vec, s, stream,
                            static_cast<const T*>(p.x), p.stride_x, p.down_w, p.down_b, p.up_w, p.up_b, p.mix, p.seed,
                            static_cast<T*>(p.y), p.z, s);
  });
}

int64_t adapter_bwd_num_partials(const AdapterBwdParams& p) {
  using namespace detail;
  return num_programs(p.shape.M, col_chunks(p.shape.D, cols_vec(p)));
}

cudaError_t adapter_bwd(const AdapterBwdParams& p, cudaStream_t stream) {
  using namespace detail;
  const AdapterShape& sh = p.shape;
  if (!adapter_supported(sh) || (sh.p_drop > 0.f && p.seed == nullptr)) return cudaErrorInvalidValue;
  if (p.need_dw && sh.p_drop > 0.f && p.zd == nullptr) return cudaErrorInvalidValue;
  if (sh.M == 0) return cudaSuccess;
  const Dims s = dims(sh);
  return dispatch_act(p.act, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const int vec = rows_vec(p);
    float* zd_out = p.need_dw && s.p_drop > 0.f ? p.zd : nullptr;
    const cudaError_t err = launch_row_tiles(
        vec == kVec ? adapter_bwd_rows_kernel<T, kVec> : adapter_bwd_rows_kernel<T, 1>, vec, s, stream,
        static_cast<const T*>(p.dy), p.stride_dy, p.z, p.up_w, p.up_b, p.mix, p.seed, p.dz, zd_out, p.dmix_rows, s);
    if (err != cudaSuccess || !(p.need_dx || p.need_dw)) return err;

    const int cvec = cols_vec(p);
    const int64_t chunks = col_chunks(s.D, cvec);
    const int64_t P = num_programs(s.M, chunks);
    const int64_t rows_per_program = (s.M + P - 1) / P;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(P));
    const float* zd = s.p_drop > 0.f ? p.zd : p.z;
    T* dx = p.need_dx ? static_cast<T*>(p.dx) : nullptr;
    auto cols = [&](auto kernel) {
      MMFAST_LAUNCH(kernel, grid, kColThreads, 0, stream)(static_cast<const T*>(p.x), p.stride_x,
                                                          static_cast<const T*>(p.dy), p.stride_dy, zd, p.dz, p.down_w,
                                                          p.mix, dx, p.da_partial, p.du_partial, p.dc_partial, s,
                                                          rows_per_program);
    };
    if (cvec == kColVec) {
      p.need_dw ? cols(adapter_bwd_cols_kernel<T, kColVec, true>) : cols(adapter_bwd_cols_kernel<T, kColVec, false>);
    } else {
      p.need_dw ? cols(adapter_bwd_cols_kernel<T, 1, true>) : cols(adapter_bwd_cols_kernel<T, 1, false>);
    }
    return cudaGetLastError();
  });
}

cudaError_t adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p_drop, int8_t* out, cudaStream_t stream) {
  if (M < 0 || R < 1 || M * R >= (int64_t{1} << 31) || seed == nullptr) return cudaErrorInvalidValue;
  const int64_t count = M * R;
  if (count == 0) return cudaSuccess;
  MMFAST_LAUNCH(detail::adapter_keep_mask_kernel, static_cast<unsigned>((count + 255) / 256), 256, 0,
                stream)(seed, count, R, p_drop, out);
  return cudaGetLastError();
}

const char* adapter_fwd_path(const AdapterFwdParams& p) {
  const int vec = detail::fwd_vec(p);
  return vec == 8 ? "v8" : (vec == 4 ? "v4" : "v1");
}

const char* adapter_bwd_path(const AdapterBwdParams& p) {
  static const char* names[3][2] = {{"v1+v1", "v1+v2"}, {"v4+v1", "v4+v2"}, {"v8+v1", "v8+v2"}};
  const int vec = detail::rows_vec(p);
  return names[vec == 8 ? 2 : (vec == 4 ? 1 : 0)][detail::cols_vec(p) == detail::kColVec ? 1 : 0];
}

}  // namespace mmfast
