// Fused RMSNorm / LayerNorm in CUDA C++: the host API of the kernels in norm_fwd.cu and norm_bwd.cu.
//
// Plain C++ over the CUDA runtime (no torch headers), so every .cu compiles on its own with nvcc; the
// torch binding lives in binding.cpp. The contracts are those of mmfast.ops.norm (DESIGN.md, "Op
// contracts"): rows of an [M, N] matrix with a unit column stride, any N >= 1, activations in
// fp32/fp16/bf16 with weight and bias in the activation dtype or fp32, fp32 statistics, RMSNorm
// rounding like HF LlamaRMSNorm and LayerNorm like nn.LayerNorm, dweight/dbias from fp32 partials
// reduced in a fixed order (no atomics), 64-bit offsets throughout.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mmfast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct NormFwdParams {
  const void* x = nullptr;         // [M, N], row stride stride_x
  const void* residual = nullptr;  // optional, [M, N], row stride stride_res
  const void* weight = nullptr;    // optional, [N], dtype wdt
  const void* bias = nullptr;      // optional (LayerNorm), [N], dtype wdt
  void* y = nullptr;               // [M, N], row stride N
  void* residual_out = nullptr;    // [M, N], row stride N; required when residual is given
  float* mean = nullptr;           // [M] (LayerNorm)
  float* rstd = nullptr;           // [M]
  int64_t M = 0, N = 0;
  int64_t stride_x = 0, stride_res = 0;
  DType act = DType::kFloat32;     // dtype of x, residual, y, residual_out
  DType wdt = DType::kFloat32;     // dtype of weight and bias (act or kFloat32)
  float eps = 0.f;
  bool rms = true;
};

struct NormBwdParams {
  const void* dy = nullptr;         // [M, N], row stride stride_dy
  const void* x = nullptr;          // [M, N], row stride stride_x: the normalised input
  const void* weight = nullptr;     // optional, [N], dtype wdt
  const float* mean = nullptr;      // [M] (LayerNorm)
  const float* rstd = nullptr;      // [M]
  const void* dres = nullptr;       // optional, [M, N], row stride stride_dres: added to dx
  void* dx = nullptr;               // [M, N], row stride N (when need_dx)
  float* dw_partial = nullptr;      // [num_partials, N] workspace (when need_dw), 16-byte aligned
  float* db_partial = nullptr;      // [num_partials, N] workspace (when need_db), 16-byte aligned
  int64_t M = 0, N = 0;
  int64_t stride_dy = 0, stride_x = 0, stride_dres = 0;
  DType act = DType::kFloat32;
  DType wdt = DType::kFloat32;
  bool rms = true;
  bool need_dx = true, need_dw = false, need_db = false;
  // 0: the rows of a register-path backward are loaded straight into registers. 2..kMaxBwdStages: the
  // 16-byte-vector register paths (the special widths) stage x, dy (and dres) through shared memory
  // with asynchronous copies, `stages` rows deep per row slot, so the loads of later rows are in
  // flight while a row is computed; paths without a staged kernel, or a device whose shared memory
  // cannot hold the stages, run the register kernel (norm_bwd_path says which ran).
  int stages = 0;
};

constexpr int kMaxBwdStages = 4;

// Forward: y (and residual_out = x + residual), mean (LayerNorm) and rstd. M == 0 launches nothing.
cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream);

// Rows of the fp32 partial-sum workspaces norm_bwd needs for these parameters on the current device
// (a bounded multiple of the SM count, smaller for small M; 0 when M == 0). Depends only on shapes,
// dtypes, alignment and the device, never on data.
int64_t norm_bwd_num_partials(const NormBwdParams& p);

// Backward: dx and the per-program partial sums of dweight/dbias (num_partials rows, see above).
cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t stream);

// out[n] = sum over p of partial[p, n], in a fixed order; out in dtype out_dt. P == 0 writes zeros. The
// workspace is consumed: a first pass may write the sums of chunks of its rows into it.
cudaError_t norm_sum_partials(float* partial, int64_t P, int64_t N, void* out, DType out_dt,
                              cudaStream_t stream);

// Which kernel a forward / backward with these parameters runs ("special-4096", "register-v8-t128", "wide-v1", ...).
const char* norm_fwd_path(const NormFwdParams& p);
const char* norm_bwd_path(const NormBwdParams& p);

}  // namespace mmfast
