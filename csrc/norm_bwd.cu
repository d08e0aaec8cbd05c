// Fused RMSNorm / LayerNorm backward with the affine-parameter gradients.
//
// Persistent grid: a bounded number of blocks (SM count x occupancy, fewer for small M) walks the rows.
// Per row: one read of x and dy (and of the incoming residual gradient), the two row dot products
// (sum of xhat*w*dy, and sum of w*dy for LayerNorm), one write of dx. Each row slot of a block keeps
// its dweight/dbias contributions in fp32 registers across all its rows and writes them once at the end
// as one row of a [num_partials, N] workspace; norm_sum_partials then sums the workspace columns in a
// fixed order. No atomics anywhere: the result is bit-identical run to run.
//
// The wide kernel (rows too long for registers) keeps its partials in its own workspace row instead,
// read-modified-written by the thread that owns those columns, and takes two passes over each row.
#include <atomic>
#include <cstdio>

#include "norm_common.cuh"

namespace mmfast {
namespace detail {

// One vector of dx = rstd * (w*dy - (xhat*c1 + c2)) + dresidual_out, rounded to T.
// (`dres` is the residual gradient's base pointer, only tested for null; r points at this vector.)
template <typename T, typename W, int VEC>
__device__ __forceinline__ void store_dx(T* dx, const float (&xh)[VEC], const float (&g)[VEC], const W* weight,
                                         int64_t col, const T* dres, const T* r, float c1, float c2, float rstd) {
  float w[VEC], rv[VEC];
  load_affine<W, VEC>(weight, col, 1.f, w);
  if (dres != nullptr) {
    load_vec_f32<T, VEC>(r, rv);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) rv[k] = 0.f;
  }
  T out[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(fmaf(g[k] * w[k] - fmaf(xh[k], c1, c2), rstd, rv[k]));
  store_vec<T, VEC>(dx, out);
}

// One vector's terms of the backward's row dot products: c[0] += xhat * w * dy and, for LayerNorm,
// c[1] += w * dy (x, dy and w widened to fp32).
template <bool RMS, int VEC, int K>
__device__ __forceinline__ void add_row_dots(float (&c)[K], const float (&xv)[VEC], const float (&g)[VEC],
                                             const float (&w)[VEC], float mean, float rstd) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float wdy = g[k] * w[k];
    c[0] = fmaf((xv[k] - mean) * rstd, wdy, c[0]);
    if constexpr (!RMS) c[1] += wdy;
  }
}

// The dweight (and dbias) partial sums of one row slot of a register kernel: ITEMS vectors in fp32
// registers across all the slot's rows, written once at the end as the slot's workspace row.
template <bool RMS, int ITEMS, int VEC>
struct AffinePartials {
  float dw[ITEMS][VEC];
  float db[RMS ? 1 : ITEMS][VEC];

  __device__ __forceinline__ AffinePartials() {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dw[i][k] = 0.f;
        if constexpr (!RMS) db[i][k] = 0.f;
      }
  }

  __device__ __forceinline__ void add(int i, const float (&g)[VEC], const float (&xh)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw[i][k] = fmaf(g[k], xh[k], dw[i][k]);
      if constexpr (!RMS) db[i][k] += g[k];
    }
  }

  template <class Geo>
  __device__ __forceinline__ void store(const NormBwdParams& p, int64_t prow, const Geo& geo) const {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = geo.unit(i);
      if (!geo.inside(u)) continue;
      if (p.need_dw) store_vec<float, VEC>(p.dw_partial + prow * geo.N + u * VEC, dw[i]);
      if constexpr (!RMS) {
        if (p.need_db) store_vec<float, VEC>(p.db_partial + prow * geo.N + u * VEC, db[i]);
      }
    }
  }
};

template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
__global__ void __launch_bounds__(block_threads(TPR)) norm_bwd_reg_kernel(const NormBwdParams p) {
  constexpr int kRows = rows_per_block(TPR);
  constexpr int K = RMS ? 1 : 2;
  __shared__ float red[kRows * (TPR / 32) * K];

  const RowGeometry<VEC, TPR, ITEMS, N_CT> geo(p.N);
  const int row_in_block = geo.row_in_block, lane = geo.lane;
  const int64_t N = geo.N;
  const float inv_n = geo.inv_n;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ dres = static_cast<const T*>(p.dres);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  AffinePartials<RMS, ITEMS, VEC> part;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRows; base < p.M;
       base += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t row = base + row_in_block;
    const bool valid = row < p.M;
    const float rstd = valid ? p.rstd[row] : 0.f;
    const float mean = (!RMS && valid) ? p.mean[row] : 0.f;

    // x and dy stay in their storage dtype in registers (half the registers for 16-bit types) and are
    // widened where used.
    T xr[ITEMS][VEC], gr[ITEMS][VEC];
    bool ok[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = geo.unit(i);
      ok[i] = valid && geo.inside(u);
      if (ok[i]) {
        load_vec<T, VEC>(x + row * p.stride_x + u * VEC, xr[i]);
        load_vec<T, VEC>(dy + row * p.stride_dy + u * VEC, gr[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xr[i][k] = gr[i][k] = from_f32<T>(0.f);
      }
    }

    if (p.need_dx) {  // uniform across the block
      float c[K];
#pragma unroll
      for (int j = 0; j < K; ++j) c[j] = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (!ok[i]) continue;
        float xv[VEC], g[VEC], w[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xv[k] = to_f32(xr[i][k]);
          g[k] = to_f32(gr[i][k]);
        }
        load_affine<W, VEC>(weight, geo.unit(i) * VEC, 1.f, w);
        add_row_dots<RMS, VEC, K>(c, xv, g, w, mean, rstd);
      }
      row_allreduce<TPR, K>(c, red, row_in_block, lane);
      const float c1 = c[0] * inv_n;
      const float c2 = RMS ? 0.f : c[K - 1] * inv_n;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (!ok[i]) continue;
        const int64_t u = geo.unit(i);
        float xh[VEC], g[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[k] = (to_f32(xr[i][k]) - mean) * rstd;
          g[k] = to_f32(gr[i][k]);
        }
        store_dx<T, W, VEC>(dx + row * N + u * VEC, xh, g, weight, u * VEC, dres,
                            dres + row * p.stride_dres + u * VEC, c1, c2, rstd);
      }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      float xh[VEC], g[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xh[k] = (to_f32(xr[i][k]) - mean) * rstd;
        g[k] = to_f32(gr[i][k]);
      }
      part.add(i, g, xh);
    }
  }
  part.store(p, static_cast<int64_t>(blockIdx.x) * kRows + row_in_block, geo);  // one workspace row per row slot
}

// ------------------------------------------------------------------------------------------------
// The staged backward: the register kernel's arithmetic, with x, dy (and dres) of the next rows
// copied into shared memory asynchronously while this row is computed. The register kernel holds a
// row in registers from its load to its dx store, so its loads in flight per SM are bounded by how
// many blocks fit in the register file (one or two rows at N >= 4096); here the registers hold only
// the dweight/dbias partials and a row's loads are issued `stages - 1` rows ahead.
//
// Each thread copies, and later reads, only its own 16-byte vectors, so no block barrier guards the
// staging buffers: cp.async.wait_group makes a thread's completed copies visible to that thread, and a
// stage is overwritten only after the same thread has read it (program order; the asm statements are
// compiler barriers). Before sm_80 the copies are plain synchronous loads and stores; the tests' CPU
// emulator performs each copy at the wait that retires its group, so a stage read too early reads stale data.
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ void copy16_async(uint4* smem, const void* gmem) {
#if defined(MMFAST_CUDA_EMULATION)
  ::mmfast_emu::cp_async16(smem, gmem);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t g = __cvta_generic_to_global(gmem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g) : "memory");
#else
  *smem = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(MMFAST_CUDA_EMULATION)
  ::mmfast_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `pending` (0..kMaxBwdStages-1) of this thread's copy groups are still in flight.
__device__ __forceinline__ void copy_async_wait(int pending) {
#if defined(MMFAST_CUDA_EMULATION)
  ::mmfast_emu::cp_async_wait(pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
  static_assert(kMaxBwdStages - 1 <= 3, "one wait_group immediate per possible depth");
#endif
}

// Bytes of dynamic shared memory a staged backward uses: stages x buffers x items x threads x 16.
__host__ __device__ constexpr int64_t staged_bytes(int stages, int bufs, int items, int threads) {
  return static_cast<int64_t>(stages) * bufs * items * threads * 16;
}

template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
__global__ void __launch_bounds__(block_threads(TPR)) norm_bwd_staged_kernel(const NormBwdParams p) {
  static_assert(VEC * sizeof(T) == 16, "staged rows move 16-byte vectors");
  constexpr int kThreads = block_threads(TPR);
  constexpr int kRows = rows_per_block(TPR);
  constexpr int K = RMS ? 1 : 2;
  __shared__ float red[kRows * (TPR / 32) * K];
  MMFAST_DYNAMIC_SHARED(uint4, staged);  // [stages][bufs][ITEMS][kThreads]

  const RowGeometry<VEC, TPR, ITEMS, N_CT> geo(p.N);
  const int row_in_block = geo.row_in_block;
  const int64_t N = geo.N;
  const float inv_n = geo.inv_n;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ dres = static_cast<const T*>(p.dres);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const int stages = p.stages;
  const bool with_dres = p.need_dx && dres != nullptr;
  const int bufs = with_dres ? 3 : 2;
  auto slot = [&](int s, int b, int i) -> uint4* {
    return staged + ((s * bufs + b) * ITEMS + i) * kThreads + threadIdx.x;
  };

  // Every thread of the block walks the same number of row groups (uniform control for the reductions).
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRows;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t iters = first < p.M ? (p.M - first + step - 1) / step : 0;

  // Copy the rows of iteration `it` into stage s; always commit a group (an empty one past the end),
  // so that "this row's group is done" is always "at most stages - 1 groups pending".
  auto issue = [&](int64_t it, int s) {
    const int64_t row = first + it * step + row_in_block;
    if (it < iters && row < p.M) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t u = geo.unit(i);
        if (!geo.inside(u)) continue;
        copy16_async(slot(s, 0, i), x + row * p.stride_x + u * VEC);
        copy16_async(slot(s, 1, i), dy + row * p.stride_dy + u * VEC);
        if (with_dres) copy16_async(slot(s, 2, i), dres + row * p.stride_dres + u * VEC);
      }
    }
    copy_async_commit();
  };

  AffinePartials<RMS, ITEMS, VEC> part;
  for (int s = 0; s < stages - 1; ++s) issue(s, s);
  int s_use = 0, s_next = stages - 1;
  int64_t row = first + row_in_block;
  // the row statistics are loaded one row ahead, into registers
  float rstd_next = (iters > 0 && row < p.M) ? p.rstd[row] : 0.f;
  float mean_next = (!RMS && iters > 0 && row < p.M) ? p.mean[row] : 0.f;

  for (int64_t it = 0; it < iters; ++it, row += step) {
    issue(it + stages - 1, s_next);
    s_next = s_next + 1 == stages ? 0 : s_next + 1;
    const bool valid = row < p.M;
    const float rstd = rstd_next, mean = mean_next;
    if (row + step < p.M) {
      rstd_next = p.rstd[row + step];
      if constexpr (!RMS) mean_next = p.mean[row + step];
    }
    copy_async_wait(stages - 1);

    float c1 = 0.f, c2 = 0.f;
    if (p.need_dx) {  // uniform across the block
      float c[K];
#pragma unroll
      for (int j = 0; j < K; ++j) c[j] = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t u = geo.unit(i);
        if (!valid || !geo.inside(u)) continue;
        float xv[VEC], g[VEC], w[VEC];
        load_vec_f32<T, VEC>(reinterpret_cast<const T*>(slot(s_use, 0, i)), xv);
        load_vec_f32<T, VEC>(reinterpret_cast<const T*>(slot(s_use, 1, i)), g);
        load_affine<W, VEC>(weight, u * VEC, 1.f, w);
        add_row_dots<RMS, VEC, K>(c, xv, g, w, mean, rstd);
      }
      row_allreduce<TPR, K>(c, red, row_in_block, geo.lane);
      c1 = c[0] * inv_n;
      c2 = RMS ? 0.f : c[K - 1] * inv_n;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = geo.unit(i);
      if (!valid || !geo.inside(u)) continue;
      float xh[VEC], g[VEC];
      load_vec_f32<T, VEC>(reinterpret_cast<const T*>(slot(s_use, 0, i)), xh);
      load_vec_f32<T, VEC>(reinterpret_cast<const T*>(slot(s_use, 1, i)), g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xh[k] = (xh[k] - mean) * rstd;
      if (p.need_dx) {
        const T* r = with_dres ? reinterpret_cast<const T*>(slot(s_use, 2, i)) : nullptr;
        store_dx<T, W, VEC>(dx + row * N + u * VEC, xh, g, weight, u * VEC, r, r, c1, c2, rstd);
      }
      part.add(i, g, xh);
    }
    s_use = s_use + 1 == stages ? 0 : s_use + 1;
  }
  copy_async_wait(0);  // only empty groups can be left; nothing may be in flight when the block exits
  part.store(p, static_cast<int64_t>(blockIdx.x) * kRows + row_in_block, geo);
}

template <typename T, typename W, bool RMS, int VEC>
__global__ void __launch_bounds__(kWideThreads) norm_bwd_wide_kernel(const NormBwdParams p) {
  constexpr int K = RMS ? 1 : 2;
  __shared__ float red[(kWideThreads / 32) * K];
  const int64_t N = p.N;
  const int64_t units = N / VEC;
  const float inv_n = 1.f / static_cast<float>(N);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dres = static_cast<const T*>(p.dres);
  const W* weight = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  float* dw_part = p.need_dw ? p.dw_partial + static_cast<int64_t>(blockIdx.x) * N : nullptr;
  float* db_part = p.need_db ? p.db_partial + static_cast<int64_t>(blockIdx.x) * N : nullptr;

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const bool first = row == blockIdx.x;
    const float rstd = p.rstd[row];
    const float mean = RMS ? 0.f : p.mean[row];
    const T* xr = x + row * p.stride_x;
    const T* gr = dy + row * p.stride_dy;
    float c1 = 0.f, c2 = 0.f;
    if (p.need_dx) {
      float c[K];
#pragma unroll
      for (int j = 0; j < K; ++j) c[j] = 0.f;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        float xv[VEC], g[VEC], w[VEC];
        load_vec_f32<T, VEC>(xr + u * VEC, xv);
        load_vec_f32<T, VEC>(gr + u * VEC, g);
        load_affine<W, VEC>(weight, u * VEC, 1.f, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float wdy = g[k] * w[k];
          c[0] = fmaf((xv[k] - mean) * rstd, wdy, c[0]);
          if constexpr (!RMS) c[1] += wdy;
        }
      }
      block_allreduce<K>(c, red);
      c1 = c[0] * inv_n;
      c2 = RMS ? 0.f : c[K - 1] * inv_n;
    }
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      float xh[VEC], g[VEC];
      load_vec_f32<T, VEC>(xr + u * VEC, xh);
      load_vec_f32<T, VEC>(gr + u * VEC, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xh[k] = (xh[k] - mean) * rstd;
      if (p.need_dx) {
        store_dx<T, W, VEC>(dx + row * N + u * VEC, xh, g, weight, u * VEC, dres,
                            dres + row * p.stride_dres + u * VEC, c1, c2, rstd);
      }
      if (p.need_dw) {
        float acc[VEC];
        if (first) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
        } else {
          load_vec<float, VEC>(dw_part + u * VEC, acc);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = fmaf(g[k], xh[k], acc[k]);
        store_vec<float, VEC>(dw_part + u * VEC, acc);
      }
      if constexpr (!RMS) {
        if (p.need_db) {
          float acc[VEC];
          if (first) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
          } else {
            load_vec<float, VEC>(db_part + u * VEC, acc);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += g[k];
          store_vec<float, VEC>(db_part + u * VEC, acc);
        }
      }
    }
  }
}

// out[c * out_stride + n] = sum of part[p * step, n] over the rows p of chunk c = blockIdx.y (c * chunk up to
// P): 32 columns x 8 slices of the rows per block, the slices summed in order. out may be part itself, at the
// first row of each chunk: a block reads its rows before it writes (the barrier between), and no other
// block reads them (so neither pointer is __restrict__).
template <typename O>
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* part, int64_t P, int64_t N, int64_t chunk,
                                                           int64_t step, O* out, int64_t out_stride) {
  __shared__ float red[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = first + chunk < P ? first + chunk : P;
  float s = 0.f;
  if (col < N) {
    for (int64_t q = first + threadIdx.y; q < end; q += 8) s += part[q * step * N + col];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) t += red[j][threadIdx.x];
    out[static_cast<int64_t>(blockIdx.y) * out_stride + col] = from_f32<O>(t);
  }
}

// ------------------------------------------------------------------------------------------------
// host side: grids, launchers, dispatch
// ------------------------------------------------------------------------------------------------

int current_sm_count();

// Rows of the [P, N] partials one block sums in a first pass (P: a single pass). The persistent backwards
// leave P of several per SM (up to kRows per block), and a pass over column blocks alone runs N / 32 blocks
// (24 at N = 768), each slice walking hundreds of rows at the latency of its loads. Where the column blocks
// fill fewer than two per SM, the rows are split too, enough for two per SM, in multiples of the 8 slices; a
// second pass adds the chunks' sums. Fixed for (P, N, SM count): the order, and so the bits, do not change
// run to run.
inline int64_t sum_chunk_rows(int64_t P, int64_t N, int sms) {
  const int64_t cols = (N + 31) / 32;
  if (P <= 64 || cols >= 2 * static_cast<int64_t>(sms)) return P;
  int64_t chunks = (2 * static_cast<int64_t>(sms) + cols - 1) / cols;
  const int64_t most = (P + 31) / 32;  // (at least 32 rows a chunk: 4 a slice)
  if (chunks > most) chunks = most;
  const int64_t chunk = (P + chunks - 1) / chunks / 8 * 8;
  return chunk < 32 ? 32 : chunk;
}

template <typename O>
cudaError_t launch_sum_partials(float* partial, int64_t P, int64_t N, void* out, cudaStream_t stream) {
  const auto cols = static_cast<unsigned>((N + 31) / 32);
  const int64_t chunk = sum_chunk_rows(P, N, current_sm_count());
  int64_t rows = P, step = 1;
  if (chunk < P) {  // the chunks' sums, in place, at the first row of each: then a pass over those rows
    const int64_t chunks = (P + chunk - 1) / chunk;
    auto first = sum_partials_kernel<float>;
    MMFAST_LAUNCH(first, dim3(cols, static_cast<unsigned>(chunks)), dim3(32, 8), 0, stream)(partial, P, N, chunk, 1,
                                                                                          partial, chunk * N);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    rows = chunks;
    step = chunk;
  }
  auto kernel = sum_partials_kernel<O>;
  MMFAST_LAUNCH(kernel, dim3(cols, 1), dim3(32, 8), 0, stream)(partial, rows, N, rows > 0 ? rows : 1, step,
                                                              static_cast<O*>(out), 0);
  return cudaGetLastError();
}

constexpr int kMaxDevices = 64;

// The per-device caches below are atomics (zero in static storage, relaxed order): host threads, one per
// device under autograd, may make their first calls at once; every writer stores the same value.
using DeviceCache = std::atomic<int>[kMaxDevices];

int current_sm_count() {
  static DeviceCache cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 1;
  int n = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    n = 1;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (n < 1) n = 1;
    if (dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident blocks per SM of `kernel` (cached per instance and device).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, DeviceCache& cache) {
  int dev = 0;
  cudaGetDevice(&dev);
  const int slot = (dev >= 0 && dev < kMaxDevices) ? dev : 0;
  int n = cache[slot].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n < 1) n = 1;
    cache[slot].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks of a persistent backward: up to kMaxBlocksPerSm per SM (fewer when occupancy allows fewer),
// each with at least kMinRowsPerProgram row groups, so small M gets fewer blocks and fewer partial rows.
// The cap bounds the workspace and the finalize's reading of it independently of M.
inline int64_t persistent_blocks(int64_t row_groups, int per_sm) {
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * (per_sm < kMaxBlocksPerSm ? per_sm : kMaxBlocksPerSm);
  int64_t want = (row_groups + kMinRowsPerProgram - 1) / kMinRowsPerProgram;
  if (want < 1) want = 1;
  return want < cap ? want : cap;
}

// Run (or, with launch == false, only size) one backward configuration; *partials = workspace rows.
template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
cudaError_t launch_bwd_reg(const NormBwdParams& p, cudaStream_t stream, bool launch, int64_t* partials) {
  static DeviceCache occ_cache;
  constexpr int kRows = rows_per_block(TPR);
  auto kernel = norm_bwd_reg_kernel<T, W, RMS, VEC, TPR, ITEMS, N_CT>;
  const int64_t blocks =
      persistent_blocks((p.M + kRows - 1) / kRows, blocks_per_sm(kernel, block_threads(TPR), occ_cache));
  *partials = blocks * kRows;
  if (!launch) return cudaSuccess;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), block_threads(TPR), 0, stream)(p);
  return cudaGetLastError();
}

template <typename T, typename W, bool RMS, int VEC>
cudaError_t launch_bwd_wide(const NormBwdParams& p, cudaStream_t stream, bool launch, int64_t* partials) {
  static DeviceCache occ_cache;
  auto kernel = norm_bwd_wide_kernel<T, W, RMS, VEC>;
  const int64_t blocks = persistent_blocks(p.M, blocks_per_sm(kernel, kWideThreads, occ_cache));
  *partials = blocks;
  if (!launch) return cudaSuccess;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), kWideThreads, 0, stream)(p);
  return cudaGetLastError();
}

// Largest dynamic shared memory a block may opt into on the current device (cached per device).
int64_t current_smem_optin() {
  static DeviceCache cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 0;
  int n = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n != 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) n = 0;
  if (dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// NormBwdParams::stages: 0 (register kernel) or 2..kMaxBwdStages.
constexpr bool stages_valid(int stages) { return stages == 0 || (stages >= 2 && stages <= kMaxBwdStages); }

// Shared-memory buffers per stage of a staged backward: x and dy, and the residual gradient when dx is wanted.
inline int staged_bufs(const NormBwdParams& p) { return p.need_dx && p.dres != nullptr ? 3 : 2; }

// Whether a backward with this configuration runs the staged kernel: stages asked for, a special width
// with 16-byte vectors, and shared memory for the stages (1 KiB left for the static reduction buffer).
bool staged_applies(const NormBwdParams& p, const Config& c) {
  if (p.stages < 2 || c.path != Path::kSpecial || c.vec * dtype_size(p.act) != 16) return false;
  const int64_t bytes = staged_bytes(p.stages, staged_bufs(p), c.items, block_threads(c.tpr));
  return bytes + 1024 <= current_smem_optin();
}

// Run (or only size) the staged backward; the caller has checked staged_applies.
template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
cudaError_t launch_bwd_staged(const NormBwdParams& p, cudaStream_t stream, bool launch, int64_t* partials) {
  constexpr int kRows = rows_per_block(TPR);
  constexpr int kThreads = block_threads(TPR);
  constexpr int kShapes = (kMaxBwdStages - 1) * 2;  // (stages, bufs) pairs
  static std::atomic<int> occ_cache[kMaxDevices][kShapes];
  static std::atomic<bool> opted_in[kMaxDevices];
  auto kernel = norm_bwd_staged_kernel<T, W, RMS, VEC, TPR, ITEMS, N_CT>;
  const int bufs = staged_bufs(p);
  const int64_t bytes = staged_bytes(p.stages, bufs, ITEMS, kThreads);
  int dev = 0;
  cudaGetDevice(&dev);
  const bool cached = dev >= 0 && dev < kMaxDevices;  // devices past the caches query every time
  if (!cached || !opted_in[dev].load(std::memory_order_relaxed)) {
    // Opt in to the most dynamic shared memory staged_applies ever accepts on this device: one value
    // for every caller, so concurrent first launches cannot leave a smaller limit behind.
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(current_smem_optin() - 1024));
    if (e != cudaSuccess) return e;
    if (cached) opted_in[dev].store(true, std::memory_order_relaxed);
  }
  const int shape = (p.stages - 2) * 2 + (bufs - 2);
  int occ = cached ? occ_cache[dev][shape].load(std::memory_order_relaxed) : 0;
  if (occ == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, static_cast<size_t>(bytes)) !=
            cudaSuccess ||
        occ < 1)
      occ = 1;
    if (cached) occ_cache[dev][shape].store(occ, std::memory_order_relaxed);
  }
  const int64_t blocks = persistent_blocks((p.M + kRows - 1) / kRows, occ);
  *partials = blocks * kRows;
  if (!launch) return cudaSuccess;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(bytes), stream)(p);
  return cudaGetLastError();
}

#define MMFAST_BWD_SPECIAL(WIDTH)                                                                                   \
  case WIDTH:                                                                                                       \
    if (staged_applies(p, c))                                                                                      \
      return launch_bwd_staged<T, W, RMS, V, spec_tpr(WIDTH / V), spec_items(WIDTH / V), WIDTH>(p, s, launch,       \
                                                                                               partials);         \
    return launch_bwd_reg<T, W, RMS, V, spec_tpr(WIDTH / V), spec_items(WIDTH / V), WIDTH>(p, s, launch, partials);

template <typename T, typename W, bool RMS>
cudaError_t bwd_typed(const NormBwdParams& p, const Config& c, cudaStream_t s, bool launch, int64_t* partials) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  switch (c.path) {
    case Path::kSpecial:
      switch (c.n_ct) {
        MMFAST_BWD_SPECIAL(768)
        MMFAST_BWD_SPECIAL(1024)
        MMFAST_BWD_SPECIAL(1280)
        MMFAST_BWD_SPECIAL(4096)
        MMFAST_BWD_SPECIAL(5120)
        MMFAST_BWD_SPECIAL(8192)
        default:
          return cudaErrorInvalidValue;
      }
    case Path::kRegister:
      if (c.vec == V) {
        switch (c.tpr) {
          case 32: return launch_bwd_reg<T, W, RMS, V, 32, kRegItems, 0>(p, s, launch, partials);
          case 64: return launch_bwd_reg<T, W, RMS, V, 64, kRegItems, 0>(p, s, launch, partials);
          case 128: return launch_bwd_reg<T, W, RMS, V, 128, kRegItems, 0>(p, s, launch, partials);
          case 256: return launch_bwd_reg<T, W, RMS, V, 256, kRegItems, 0>(p, s, launch, partials);
          default: return cudaErrorInvalidValue;
        }
      }
      switch (c.tpr) {
        case 32: return launch_bwd_reg<T, W, RMS, 1, 32, kRegItems, 0>(p, s, launch, partials);
        case 128: return launch_bwd_reg<T, W, RMS, 1, 128, kRegItems, 0>(p, s, launch, partials);
        case 256: return launch_bwd_reg<T, W, RMS, 1, 256, kRegItems, 0>(p, s, launch, partials);
        default: return cudaErrorInvalidValue;
      }
    case Path::kWide:
      return c.vec == V ? launch_bwd_wide<T, W, RMS, V>(p, s, launch, partials)
                        : launch_bwd_wide<T, W, RMS, 1>(p, s, launch, partials);
  }
  return cudaErrorInvalidValue;
}

#undef MMFAST_BWD_SPECIAL

bool bwd_vec_ok(const NormBwdParams& p) {
  const int v = 16 / dtype_size(p.act);
  bool ok = p.N % v == 0 && p.stride_x % v == 0 && p.stride_dy % v == 0 && aligned16(p.x) && aligned16(p.dy);
  if (p.need_dx) ok = ok && aligned16(p.dx);
  if (p.dres != nullptr) ok = ok && p.stride_dres % v == 0 && aligned16(p.dres);
  if (p.weight != nullptr) ok = ok && aligned16(p.weight);
  return ok;  // the workspaces are 16-byte aligned by contract (norm.h), so they never decide the path
}

cudaError_t bwd_run(const NormBwdParams& p, cudaStream_t stream, bool launch, int64_t* partials) {
  *partials = 0;
  if (p.M == 0) return cudaSuccess;
  const Config c = choose_config(p.N, p.act, bwd_vec_ok(p), /*backward=*/true);
  return dispatch_norm(p.act, p.wdt, p.rms, [&](auto t, auto w, auto r) -> cudaError_t {
    return bwd_typed<typename decltype(t)::type, typename decltype(w)::type, decltype(r)::value>(p, c, stream, launch,
                                                                                               partials);
  });
}

const char* config_name(const Config& c) {
  static thread_local char buf[48];  // valid until this thread's next call
  switch (c.path) {
    case Path::kSpecial:
      snprintf(buf, sizeof(buf), "special-%d", c.n_ct);
      break;
    case Path::kRegister:
      snprintf(buf, sizeof(buf), "register-v%d-t%d", c.vec, c.tpr);
      break;
    case Path::kWide:
      snprintf(buf, sizeof(buf), "wide-v%d", c.vec);
      break;
  }
  return buf;
}

}  // namespace detail

int64_t norm_bwd_num_partials(const NormBwdParams& p) {
  if (!detail::stages_valid(p.stages)) return -1;
  int64_t partials = 0;
  if (detail::bwd_run(p, nullptr, false, &partials) != cudaSuccess) return -1;
  return partials;
}

cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 1) return cudaErrorInvalidValue;
  if (!detail::stages_valid(p.stages)) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;  // before the pointer checks: empty tensors have null data pointers
  if (p.x == nullptr || p.dy == nullptr || p.rstd == nullptr) return cudaErrorInvalidValue;
  if (!p.rms && p.mean == nullptr) return cudaErrorInvalidValue;
  if ((p.need_dx && p.dx == nullptr) || (p.need_dw && p.dw_partial == nullptr) ||
      (p.need_db && (p.rms || p.db_partial == nullptr)))
    return cudaErrorInvalidValue;
  if ((p.need_dw && !detail::aligned16(p.dw_partial)) || (p.need_db && !detail::aligned16(p.db_partial)))
    return cudaErrorMisalignedAddress;
  int64_t partials = 0;
  return detail::bwd_run(p, stream, true, &partials);
}

cudaError_t norm_sum_partials(float* partial, int64_t P, int64_t N, void* out, DType out_dt,
                              cudaStream_t stream) {
  if (N < 1 || out == nullptr || (P > 0 && partial == nullptr)) return cudaErrorInvalidValue;
  switch (out_dt) {
    case DType::kFloat32: return detail::launch_sum_partials<float>(partial, P, N, out, stream);
    case DType::kFloat16: return detail::launch_sum_partials<__half>(partial, P, N, out, stream);
    case DType::kBFloat16: return detail::launch_sum_partials<__nv_bfloat16>(partial, P, N, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

const char* norm_bwd_path(const NormBwdParams& p) {
  if (!detail::stages_valid(p.stages)) return "invalid-stages";
  const detail::Config c = detail::choose_config(p.N, p.act, detail::bwd_vec_ok(p), /*backward=*/true);
  const char* name = detail::config_name(c);
  if (!detail::staged_applies(p, c)) return name;
  static thread_local char buf[64];  // valid until this thread's next call
  snprintf(buf, sizeof(buf), "%s-staged%d", name, p.stages);
  return buf;
}

}  // namespace mmfast
