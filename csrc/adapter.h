// The fused Mixture-of-Modality adapter in CUDA C++: the host API of the kernels in adapter.cu.
//
// Plain C++ over the CUDA runtime (no torch headers); the torch binding lives in binding.cpp. The contract
// is that of mmfast.ops.adapter (METHODS.md, section 2), for tokens x [M, D] (M = B * S rows with a unit
// column stride, sample b = row / S), router weights mix [B, E]:
//
//   z  = x A^T + a                                   A [R, D], a [R]          (fp32, saved for backward)
//   zd = dropout(z)                                  keep mask from (seed, row * R + j), scaled by 1/(1-p)
//   y  = x + s * sum_e mix[b, e] * (zd ._G U_e^T + c_e)         U [E, D, R/G], c [E, D]
//
// ._G is the grouped up-projection: output channel d of group g = d / (D/G) reads hidden channels
// [g R/G, (g+1) R/G). The dropout stream is the one the Triton kernels draw (Philox 4x32, 10 rounds, key
// = the seed, counter = row * R + j; keep where the uniform draw >= p), so both backends drop the same
// activations for the same seed. Weights, biases and mix are fp32 (the binding widens 16-bit ones,
// exactly); x, y, dy, dx are fp32, fp16 or bf16; every product and sum is fp32.
//
// These kernels keep a row tile's hidden activations and expert sums in registers, so they take at most
// kAdapterMaxHidden hidden channels and kAdapterMaxExperts experts (the released LaVIN adapters: 8 and
// 2); adapter_supported says whether a shape fits, and the ops layer runs Triton otherwise.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "norm.h"  // DType

namespace mmfast {

constexpr int kAdapterMaxHidden = 8;
constexpr int kAdapterMaxExperts = 2;

struct AdapterShape {
  int64_t M = 0;  // rows (tokens)
  int64_t S = 1;  // rows per sample (mix row of a token: row / S)
  int64_t D = 0;  // model width
  int R = 0;      // hidden channels
  int E = 0;      // experts
  int G = 1;      // groups of the up-projection (divides R and D)
  float scale = 1.f;
  float p_drop = 0.f;      // dropout probability in [0, 1)
  float keep_scale = 1.f;  // 1 / (1 - p), rounded to fp32 once from the double (as the Triton launchers pass it)
};

struct AdapterFwdParams {
  AdapterShape shape;
  const void* x = nullptr;            // [M, D], row stride stride_x, dtype act
  const float* down_w = nullptr;      // A [R, D], contiguous
  const float* down_b = nullptr;      // a [R]
  const float* up_w = nullptr;        // U [E, D, R/G], contiguous
  const float* up_b = nullptr;        // c [E, D], contiguous
  const float* mix = nullptr;         // [B, E], contiguous
  const int64_t* seed = nullptr;      // [1], when p_drop > 0
  void* y = nullptr;                  // [M, D], row stride D
  float* z = nullptr;                 // [M, R]: z before dropout
  int64_t stride_x = 0;
  DType act = DType::kFloat32;
};

struct AdapterBwdParams {
  AdapterShape shape;
  const void* dy = nullptr;           // [M, D], row stride stride_dy
  const void* x = nullptr;            // [M, D], row stride stride_x
  const float* z = nullptr;           // [M, R]: the forward's z
  const float* down_w = nullptr;
  const float* up_w = nullptr;
  const float* up_b = nullptr;
  const float* mix = nullptr;
  const int64_t* seed = nullptr;
  void* dx = nullptr;                 // [M, D], row stride D (when need_dx)
  float* dz = nullptr;                // [M, R] workspace: d z (the gradient of down_b is its column sum)
  float* zd = nullptr;                // [M, R] workspace, when p_drop > 0 and need_dw: z after dropout
  float* dmix_rows = nullptr;         // [M, E] workspace: d mix per row (summed per sample by the caller)
  float* da_partial = nullptr;        // [num_partials, R * D] workspace (when need_dw)
  float* du_partial = nullptr;        // [num_partials, E * D * R/G] workspace (when need_dw)
  float* dc_partial = nullptr;        // [num_partials, E * D] workspace (when need_dw)
  int64_t stride_dy = 0, stride_x = 0;
  DType act = DType::kFloat32;
  bool need_dx = true, need_dw = true;
};

// Whether these kernels take the shape (hidden and expert counts within their limits, groups dividing
// R and D, M * R below 2^31 (the dropout counter), a dropout probability in [0, 1)).
bool adapter_supported(const AdapterShape& s);

// Forward: y and z. M == 0 launches nothing.
cudaError_t adapter_fwd(const AdapterFwdParams& p, cudaStream_t stream);

// Rows of the partial-sum workspaces adapter_bwd needs (a bounded multiple of the SM count, fewer for
// small M; 0 when M == 0); depends only on the shape and the device.
int64_t adapter_bwd_num_partials(const AdapterBwdParams& p);

// Backward: dz and dmix_rows always; dx when need_dx; the per-program partial sums of dA, dU (already
// times s) and dc (times s) when need_dw, to be summed over programs with norm_sum_partials.
cudaError_t adapter_bwd(const AdapterBwdParams& p, cudaStream_t stream);

// The dropout keep mask the kernels draw for seed: out[m * R + j] = 1 (kept) or 0, for m < M, j < R.
cudaError_t adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p_drop, int8_t* out, cudaStream_t stream);

// Which kernels run these parameters ("v8": 8 columns per access in the row kernels; bwd adds the column
// kernel's, "v8+v2").
const char* adapter_fwd_path(const AdapterFwdParams& p);
const char* adapter_bwd_path(const AdapterBwdParams& p);

}  // namespace mmfast
