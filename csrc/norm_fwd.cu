// Fused RMSNorm / LayerNorm forward (optionally with the pre-norm residual add).
//
// Register kernels hold a whole row in registers: one read of x (and the residual), one write of y
// (and residual_out), statistics from the registers (LayerNorm: mean first, then the centred sum of
// squares, both exact two-pass). TPR threads share a row; narrow rows pack several rows per block.
// The specialised widths (768 ... 8192) are compile-time instances of the same kernel whose rows fill
// the threads exactly, so every predicate folds away.
//
// The wide kernel takes any N: one block per row loops over the row twice (statistics with Chan's
// merge of per-vector moments, then the output), reading the row a second time from L2.
#include "norm_common.cuh"

namespace mmfast {
namespace detail {

// fp32's largest finite value: a LayerNorm variance above it has overflowed (the row is NaN, as PyTorch's)
constexpr float kFp32Max = 3.40282346638528859811704183484516925440e+38f;

// One vector of the normalised input: x, or residual_out = round(x + residual), which is also stored.
// (`res` is the residual's base pointer, only tested for null; r and h point at this vector.)
template <typename T, int VEC>
__device__ __forceinline__ void load_input(const T* x, const T* res, const T* r, T* h, T (&out)[VEC]) {
  load_vec<T, VEC>(x, out);
  if (res != nullptr) {
    T rv[VEC];
    load_vec<T, VEC>(r, rv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(to_f32(out[k]) + to_f32(rv[k]));
    store_vec<T, VEC>(h, out);
  }
}

template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
__global__ void __launch_bounds__(block_threads(TPR)) norm_fwd_reg_kernel(const NormFwdParams p) {
  constexpr int kRows = rows_per_block(TPR);
  __shared__ float red[kRows * (TPR / 32)];

  const RowGeometry<VEC, TPR, ITEMS, N_CT> geo(p.N);
  const int row_in_block = geo.row_in_block, lane = geo.lane;
  const int64_t N = geo.N;
  const float inv_n = geo.inv_n;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  const W* __restrict__ bias = static_cast<const W*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ h_out = static_cast<T*>(p.residual_out);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRows; base < p.M;
       base += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t row = base + row_in_block;
    const bool valid = row < p.M;

    float h[ITEMS][VEC];
    bool ok[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = geo.unit(i);
      ok[i] = valid && geo.inside(u);
      if (ok[i]) {
        T xv[VEC];
        load_input<T, VEC>(x + row * p.stride_x + u * VEC, res, res + row * p.stride_res + u * VEC,
                           h_out + row * N + u * VEC, xv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[i][k] = to_f32(xv[k]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[i][k] = 0.f;
      }
    }

    float mean = 0.f;
    if constexpr (!RMS) {
      float s[1] = {0.f};
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k) s[0] += h[i][k];
      row_allreduce<TPR, 1>(s, red, row_in_block, lane);
      mean = s[0] * inv_n;
    }
    float ss[1] = {0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (ok[i]) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = h[i][k] - mean;
          ss[0] = fmaf(d, d, ss[0]);
        }
      }
    }
    row_allreduce<TPR, 1>(ss, red, row_in_block, lane);
    // a LayerNorm variance past fp32's range would make every y the bias
    const float rstd = (!RMS && ss[0] * inv_n > kFp32Max) ? nanf("") : rsqrtf(ss[0] * inv_n + p.eps);
    if (valid && lane == 0) {
      p.rstd[row] = rstd;
      if constexpr (!RMS) p.mean[row] = mean;
    }

#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!ok[i]) continue;
      const int64_t u = geo.unit(i);
      float w[VEC];
      load_affine<W, VEC>(weight, u * VEC, 1.f, w);
      T out[VEC];
      if constexpr (RMS) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(to_f32(from_f32<T>(h[i][k] * rstd)) * w[k]);
      } else {
        float b[VEC];
        load_affine<W, VEC>(bias, u * VEC, 0.f, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(fmaf((h[i][k] - mean) * rstd, w[k], b[k]));
      }
      store_vec<T, VEC>(y + row * N + u * VEC, out);
    }
  }
}

template <typename T, typename W, bool RMS, int VEC>
__global__ void __launch_bounds__(kWideThreads) norm_fwd_wide_kernel(const NormFwdParams p) {
  __shared__ float red[3 * (kWideThreads / 32)];
  const int64_t N = p.N;
  const int64_t units = N / VEC;
  const float inv_n = 1.f / static_cast<float>(N);
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  T* y = static_cast<T*>(p.y);
  T* h_out = static_cast<T*>(p.residual_out);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    float ss[1] = {0.f};
    Moments m{0.f, 0.f, 0.f};
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      T xv[VEC];
      load_input<T, VEC>(x + row * p.stride_x + u * VEC, res, res + row * p.stride_res + u * VEC,
                         h_out + row * N + u * VEC, xv);
      if constexpr (RMS) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ss[0] = fmaf(to_f32(xv[k]), to_f32(xv[k]), ss[0]);
      } else {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < VEC; ++k) s += to_f32(xv[k]);
        const float um = s * (1.f / VEC);
        float m2 = 0.f;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_f32(xv[k]) - um;
          m2 = fmaf(d, d, m2);
        }
        m = merge(m, Moments{static_cast<float>(VEC), um, m2});
      }
    }
    float mean = 0.f, var;
    if constexpr (RMS) {
      block_allreduce<1>(ss, red);
      var = ss[0] * inv_n;
    } else {
      m = block_moments(m, red);
      mean = m.mean;
      var = m.m2 * inv_n;
    }
    // a LayerNorm variance past fp32's range would make every y the bias
    const float rstd = (!RMS && var > kFp32Max) ? nanf("") : rsqrtf(var + p.eps);
    if (threadIdx.x == 0) {
      p.rstd[row] = rstd;
      if constexpr (!RMS) p.mean[row] = mean;
    }
    // second pass: the row again (residual_out as written above by this same thread), then y
    const T* src = res != nullptr ? h_out + row * N : x + row * p.stride_x;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      float hv[VEC], w[VEC];
      load_vec_f32<T, VEC>(src + u * VEC, hv);
      load_affine<W, VEC>(weight, u * VEC, 1.f, w);
      T out[VEC];
      if constexpr (RMS) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(to_f32(from_f32<T>(hv[k] * rstd)) * w[k]);
      } else {
        float b[VEC];
        load_affine<W, VEC>(bias, u * VEC, 0.f, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = from_f32<T>(fmaf((hv[k] - mean) * rstd, w[k], b[k]));
      }
      store_vec<T, VEC>(y + row * N + u * VEC, out);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

constexpr int64_t kMaxGrid = 0x7fffffff;

template <typename T, typename W, bool RMS, int VEC, int TPR, int ITEMS, int N_CT>
cudaError_t launch_fwd_reg(const NormFwdParams& p, cudaStream_t stream) {
  constexpr int kRows = rows_per_block(TPR);
  const int64_t blocks = (p.M + kRows - 1) / kRows;
  auto kernel = norm_fwd_reg_kernel<T, W, RMS, VEC, TPR, ITEMS, N_CT>;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid), block_threads(TPR), 0, stream)(p);
  return cudaGetLastError();
}

template <typename T, typename W, bool RMS, int VEC>
cudaError_t launch_fwd_wide(const NormFwdParams& p, cudaStream_t stream) {
  auto kernel = norm_fwd_wide_kernel<T, W, RMS, VEC>;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(p.M < kMaxGrid ? p.M : kMaxGrid), kWideThreads, 0, stream)(p);
  return cudaGetLastError();
}

#define MMFAST_FWD_SPECIAL(WIDTH)                                                               \
  case WIDTH:                                                                                   \
    return launch_fwd_reg<T, W, RMS, V, spec_tpr(WIDTH / V), spec_items(WIDTH / V), WIDTH>(p, s);

template <typename T, typename W, bool RMS>
cudaError_t fwd_typed(const NormFwdParams& p, const Config& c, cudaStream_t s) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  switch (c.path) {
    case Path::kSpecial:
      switch (c.n_ct) {
        MMFAST_FWD_SPECIAL(768)
        MMFAST_FWD_SPECIAL(1024)
        MMFAST_FWD_SPECIAL(1280)
        MMFAST_FWD_SPECIAL(4096)
        MMFAST_FWD_SPECIAL(5120)
        MMFAST_FWD_SPECIAL(8192)
        default:
          return cudaErrorInvalidValue;
      }
    case Path::kRegister:
      if (c.vec == V) {
        switch (c.tpr) {
          case 32: return launch_fwd_reg<T, W, RMS, V, 32, kRegItems, 0>(p, s);
          case 64: return launch_fwd_reg<T, W, RMS, V, 64, kRegItems, 0>(p, s);
          case 128: return launch_fwd_reg<T, W, RMS, V, 128, kRegItems, 0>(p, s);
          case 256: return launch_fwd_reg<T, W, RMS, V, 256, kRegItems, 0>(p, s);
          case 512: return launch_fwd_reg<T, W, RMS, V, 512, kRegItems, 0>(p, s);
          default: return cudaErrorInvalidValue;
        }
      }
      switch (c.tpr) {
        case 32: return launch_fwd_reg<T, W, RMS, 1, 32, kRegItems, 0>(p, s);
        case 128: return launch_fwd_reg<T, W, RMS, 1, 128, kRegItems, 0>(p, s);
        case 512: return launch_fwd_reg<T, W, RMS, 1, 512, kRegItems, 0>(p, s);
        default: return cudaErrorInvalidValue;
      }
    case Path::kWide:
      return c.vec == V ? launch_fwd_wide<T, W, RMS, V>(p, s) : launch_fwd_wide<T, W, RMS, 1>(p, s);
  }
  return cudaErrorInvalidValue;
}

#undef MMFAST_FWD_SPECIAL

bool fwd_vec_ok(const NormFwdParams& p) {
  const int v = 16 / dtype_size(p.act);
  bool ok = p.N % v == 0 && p.stride_x % v == 0 && aligned16(p.x) && aligned16(p.y);
  if (p.residual != nullptr)
    ok = ok && p.stride_res % v == 0 && aligned16(p.residual) && aligned16(p.residual_out);
  if (p.weight != nullptr) ok = ok && aligned16(p.weight);
  if (p.bias != nullptr) ok = ok && aligned16(p.bias);
  return ok;
}

}  // namespace detail

cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 1) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;  // before the pointer checks: empty tensors have null data pointers
  if (p.x == nullptr || p.y == nullptr || p.rstd == nullptr) return cudaErrorInvalidValue;
  if (!p.rms && p.mean == nullptr) return cudaErrorInvalidValue;
  if (p.residual != nullptr && p.residual_out == nullptr) return cudaErrorInvalidValue;
  const detail::Config c = detail::choose_config(p.N, p.act, detail::fwd_vec_ok(p), /*backward=*/false);
  return detail::dispatch_norm(p.act, p.wdt, p.rms, [&](auto t, auto w, auto r) -> cudaError_t {
    return detail::fwd_typed<typename decltype(t)::type, typename decltype(w)::type, decltype(r)::value>(p, c, stream);
  });
}

const char* norm_fwd_path(const NormFwdParams& p) {
  return detail::config_name(detail::choose_config(p.N, p.act, detail::fwd_vec_ok(p), /*backward=*/false));
}

}  // namespace mmfast
