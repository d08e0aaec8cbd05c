// Registers the CUDA C++ kernels (the norms and the MMA adapter) as torch ops in the `mmfast_cuda` namespace.
//
// The kernels (norm_fwd.cu, norm_bwd.cu, adapter.cu) know nothing of torch; this file allocates outputs and
// workspaces with the caching allocator, picks the current stream and device, and maps dtypes. The
// autograd and the public functions stay in mmfast.ops.norm and mmfast.ops.adapter, which call these ops
// for their `cuda` backend.
//
//   mmfast_cuda::norm_fwd(x, weight, bias, residual, eps, rms) -> (y, residual_out, mean, rstd)
//   mmfast_cuda::norm_bwd(dy, x, weight, mean, rstd, dresidual_out, rms, need_dx, need_dw, need_db,
//                         dw_dtype, db_dtype, stages=0) -> (dx, dweight, dbias)
//   mmfast_cuda::norm_path(x, weight, bias, residual, rms, backward, stages=0) -> str   (which kernel runs)
//
//   mmfast_cuda::adapter_fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed, S) -> (y, z)
//   mmfast_cuda::adapter_bwd(dy, x, z, down_w, up_w, up_b, mix, scale, groups, p, seed, S, need_dx, need_dw)
//                            -> (dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix)   (weight gradients in fp32)
//   mmfast_cuda::adapter_keep_mask(seed, M, R, p) -> bool [M, R]
//   mmfast_cuda::adapter_path(x, down_w, up_w, groups, backward) -> str
//
// The adapter's x and dy are [B * S, D] row views (S tokens per sample, mix [B, E]); its weights, biases and
// mix are widened to contiguous fp32 here (exact; a no-op for the fp32 adapters of the tuning recipe).
//
// stages (0, or 2..kMaxBwdStages): how many rows deep the backward stages its inputs through shared
// memory where it has a staged kernel (NormBwdParams::stages); 0 loads rows straight into registers.
//
// x, residual, dy and dresidual_out are [M, N] row views with a unit column stride (rows may be
// strided); tensors that are not returned are empty. Arguments are validated in Python before any call;
// the checks here guard the kernels' own assumptions.
#include <Python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adapter.h"
#include "norm.h"

namespace {

using at::Tensor;

mmfast::DType to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return mmfast::DType::kFloat32;
    case at::kHalf: return mmfast::DType::kFloat16;
    case at::kBFloat16: return mmfast::DType::kBFloat16;
    default: TORCH_CHECK(false, "mmfast_cuda: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
  return mmfast::DType::kFloat32;
}

void check_rows(const Tensor& t, const Tensor& x, const char* what) {
  TORCH_CHECK(t.is_cuda(), "mmfast_cuda: ", what, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "mmfast_cuda: ", what,
              " must be [M, N] like x");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, "mmfast_cuda: ", what, " needs a unit column stride");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mmfast_cuda: ", what, " must have x's dtype");
  TORCH_CHECK(t.device() == x.device(), "mmfast_cuda: ", what, " must be on x's device");
}

void check_vector(const Tensor& t, const Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device(), "mmfast_cuda: ", what, " must be on x's device");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && (t.stride(0) == 1 || t.size(0) == 1), "mmfast_cuda: ", what,
              " must be a contiguous vector of length N");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "mmfast_cuda: ", what,
              " must be in x's dtype or float32");
}

int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mmfast_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

// Weight and bias share one dtype in the kernels: mixed (one fp32, one 16-bit) widens both to fp32,
// which is exact. Returns the dtype the kernels see.
at::ScalarType affine_dtype(std::optional<Tensor>& weight, std::optional<Tensor>& bias, const Tensor& x) {
  if (weight && bias && weight->scalar_type() != bias->scalar_type()) {
    weight = weight->to(at::kFloat);
    bias = bias->to(at::kFloat);
  }
  if (weight) return weight->scalar_type();
  if (bias) return bias->scalar_type();
  return x.scalar_type();
}

mmfast::NormFwdParams fwd_params(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                 const std::optional<Tensor>& residual, at::ScalarType wdt, double eps, bool rms) {
  mmfast::NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight ? weight->data_ptr() : nullptr;
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.M = x.size(0);
  p.N = x.size(1);
  p.stride_x = row_stride(x);
  p.stride_res = residual ? row_stride(*residual) : 0;
  p.act = to_dtype(x.scalar_type(), "x");
  p.wdt = to_dtype(wdt, "weight");
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const std::optional<Tensor>& weight_in,
                                                    const std::optional<Tensor>& bias_in,
                                                    const std::optional<Tensor>& residual, double eps, bool rms) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "mmfast_cuda::norm_fwd: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.size(1) >= 1, "mmfast_cuda::norm_fwd: empty rows");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "mmfast_cuda::norm_fwd: x needs a unit column stride");
  TORCH_CHECK(!(rms && bias_in), "mmfast_cuda::norm_fwd: RMSNorm takes no bias");
  if (residual) check_rows(*residual, x, "residual");
  std::optional<Tensor> weight = weight_in, bias = bias_in;
  if (weight) check_vector(*weight, x, "weight");
  if (bias) check_vector(*bias, x, "bias");
  const at::ScalarType wdt = affine_dtype(weight, bias, x);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t M = x.size(0), N = x.size(1);
  Tensor y = at::empty({M, N}, x.options());
  Tensor h = residual ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : M}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));

  mmfast::NormFwdParams p = fwd_params(x, weight, bias, residual, wdt, eps, rms);
  p.y = y.data_ptr();
  p.residual_out = residual ? h.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  check_cuda(mmfast::norm_fwd(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "norm_fwd");
  return {y, h, mean, rstd};
}

mmfast::NormBwdParams bwd_params(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& mean, const Tensor& rstd,
                                 const std::optional<Tensor>& dres, bool rms, bool need_dx, bool need_dw,
                                 bool need_db) {
  mmfast::NormBwdParams p;
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight ? weight->data_ptr() : nullptr;
  p.mean = mean && !rms ? mean->data_ptr<float>() : nullptr;  // RMSNorm has no mean: one given is ignored
  p.rstd = rstd.data_ptr<float>();
  p.dres = dres ? dres->data_ptr() : nullptr;
  p.M = x.size(0);
  p.N = x.size(1);
  p.stride_dy = row_stride(dy);
  p.stride_x = row_stride(x);
  p.stride_dres = dres ? row_stride(*dres) : 0;
  p.act = to_dtype(x.scalar_type(), "x");
  p.wdt = to_dtype(weight ? weight->scalar_type() : x.scalar_type(), "weight");
  p.rms = rms;
  p.need_dx = need_dx;
  p.need_dw = need_dw;
  p.need_db = need_db;
  return p;
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& mean, const Tensor& rstd,
                                            const std::optional<Tensor>& dresidual_out, bool rms, bool need_dx,
                                            bool need_dw, bool need_db, std::optional<at::ScalarType> dw_dtype,
                                            std::optional<at::ScalarType> db_dtype, int64_t stages) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "mmfast_cuda::norm_bwd: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "mmfast_cuda::norm_bwd: x needs a unit column stride");
  check_rows(dy, x, "dy");
  if (dresidual_out) check_rows(*dresidual_out, x, "dresidual_out");
  if (weight) check_vector(*weight, x, "weight");
  TORCH_CHECK(!need_dw || weight, "mmfast_cuda::norm_bwd: need_dw requires a weight");
  TORCH_CHECK(!(rms && need_db), "mmfast_cuda::norm_bwd: RMSNorm has no bias");
  // the statistics are read as raw float pointers: dtype, length, layout and device all checked here
  const auto is_stat = [&x](const Tensor& t) {
    return t.scalar_type() == at::kFloat && t.numel() == x.size(0) && t.is_contiguous() && t.device() == x.device();
  };
  TORCH_CHECK(rms || (mean && is_stat(*mean)),
              "mmfast_cuda::norm_bwd: LayerNorm needs mean: float32 [M], contiguous, on x's device");
  TORCH_CHECK(is_stat(rstd), "mmfast_cuda::norm_bwd: rstd must be float32 [M], contiguous, on x's device");
  TORCH_CHECK(stages == 0 || (stages >= 2 && stages <= mmfast::kMaxBwdStages),
              "mmfast_cuda::norm_bwd: stages must be 0 or 2..", mmfast::kMaxBwdStages, ", got ", stages);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const int64_t M = x.size(0), N = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor dx = need_dx ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  Tensor dw = need_dw ? at::empty({N}, x.options().dtype(dw_dtype.value_or(weight->scalar_type())))
                      : at::empty({0}, x.options());
  Tensor db = need_db ? at::empty({N}, x.options().dtype(db_dtype.value_or(x.scalar_type())))
                      : at::empty({0}, x.options());
  if (!(need_dx || need_dw || need_db)) return {dx, dw, db};

  mmfast::NormBwdParams p = bwd_params(dy, x, weight, mean, rstd, need_dx ? dresidual_out : std::nullopt, rms,
                                       need_dx, need_dw, need_db);
  p.stages = static_cast<int>(stages);
  const int64_t P = mmfast::norm_bwd_num_partials(p);
  TORCH_CHECK(P >= 0, "mmfast_cuda::norm_bwd: unsupported dtypes, or the kernel's launch setup failed (",
              cudaGetErrorString(cudaGetLastError()), ")");
  Tensor dw_part = need_dw ? at::empty({P, N}, fopts) : at::empty({0}, fopts);
  Tensor db_part = need_db ? at::empty({P, N}, fopts) : at::empty({0}, fopts);
  p.dx = need_dx ? dx.data_ptr() : nullptr;
  p.dw_partial = need_dw ? dw_part.data_ptr<float>() : nullptr;
  p.db_partial = need_db ? db_part.data_ptr<float>() : nullptr;
  if (M > 0) check_cuda(mmfast::norm_bwd(p, stream), "norm_bwd");
  if (need_dw)
    check_cuda(mmfast::norm_sum_partials(dw_part.data_ptr<float>(), P, N, dw.data_ptr(), to_dtype(dw.scalar_type(), "dweight"),
                                         stream),
               "norm_bwd (dweight)");
  if (need_db)
    check_cuda(mmfast::norm_sum_partials(db_part.data_ptr<float>(), P, N, db.data_ptr(), to_dtype(db.scalar_type(), "dbias"),
                                         stream),
               "norm_bwd (dbias)");
  return {dx, dw, db};
}

std::string norm_path(const Tensor& x, const std::optional<Tensor>& weight_in, const std::optional<Tensor>& bias_in,
                      const std::optional<Tensor>& residual, bool rms, bool backward, int64_t stages) {
  TORCH_CHECK(x.dim() == 2, "mmfast_cuda::norm_path: x must be 2-D");
  const c10::cuda::CUDAGuard guard(x.device());  // the path depends on x's device (SMs, shared memory)
  std::optional<Tensor> weight = weight_in, bias = bias_in;
  const at::ScalarType wdt = affine_dtype(weight, bias, x);
  if (backward) {
    // dx, dy and the residual gradient are fresh contiguous tensors in the backward; only the
    // pointers' alignment matters here, and x's stands in for theirs.
    mmfast::NormBwdParams p;
    p.dy = p.x = x.data_ptr();
    p.dx = x.data_ptr();
    p.weight = weight ? weight->data_ptr() : nullptr;
    p.M = x.size(0);
    p.N = x.size(1);
    p.stride_dy = p.stride_x = row_stride(x);
    p.act = to_dtype(x.scalar_type(), "x");
    p.wdt = to_dtype(wdt, "weight");
    p.rms = rms;
    p.need_dw = weight.has_value();
    p.need_db = !rms && bias.has_value();
    p.dres = residual ? residual->data_ptr() : nullptr;  // a residual forward has a residual gradient
    p.stride_dres = residual ? row_stride(*residual) : 0;
    TORCH_CHECK(stages == 0 || (stages >= 2 && stages <= mmfast::kMaxBwdStages),
                "mmfast_cuda::norm_path: stages must be 0 or 2..", mmfast::kMaxBwdStages, ", got ", stages);
    p.stages = static_cast<int>(stages);
    return mmfast::norm_bwd_path(p);
  }
  mmfast::NormFwdParams p = fwd_params(x, weight, bias, residual, wdt, 1e-6, rms);
  p.y = x.data_ptr();
  p.residual_out = residual ? x.data_ptr() : nullptr;
  return mmfast::norm_fwd_path(p);
}

// ------------------------------------------------------------------------------------------------
// the MMA adapter
// ------------------------------------------------------------------------------------------------

Tensor fp32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The adapter's shape from its tensors, every one checked (device, dims) before any pointer is taken.
mmfast::AdapterShape adapter_shape(const Tensor& x, int64_t S, const Tensor& down_w, const Tensor& down_b,
                                   const Tensor& up_w, const Tensor& up_b, const Tensor& mix, int64_t groups,
                                   double scale, double p) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "mmfast_cuda::adapter: x must be a 2-D CUDA tensor [B * S, D]");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "mmfast_cuda::adapter: x needs a unit column stride");
  for (const Tensor* t : {&down_w, &down_b, &up_w, &up_b, &mix}) {
    TORCH_CHECK(t->device() == x.device(), "mmfast_cuda::adapter: every tensor must be on x's device");
  }
  const int64_t D = x.size(1);
  TORCH_CHECK(down_w.dim() == 2 && down_w.size(1) == D, "mmfast_cuda::adapter: down_w must be [R, D]");
  const int64_t R = down_w.size(0);
  TORCH_CHECK(down_b.dim() == 1 && down_b.size(0) == R, "mmfast_cuda::adapter: down_b must be [R]");
  TORCH_CHECK(up_w.dim() == 3 && up_w.size(1) == D && groups >= 1 && up_w.size(2) * groups == R,
              "mmfast_cuda::adapter: up_w must be [E, D, R / groups]");
  const int64_t E = up_w.size(0);
  TORCH_CHECK(up_b.dim() == 2 && up_b.size(0) == E && up_b.size(1) == D, "mmfast_cuda::adapter: up_b must be [E, D]");
  TORCH_CHECK(mix.dim() == 2 && mix.size(1) == E, "mmfast_cuda::adapter: mix must be [B, E]");
  TORCH_CHECK(S >= 1 && mix.size(0) * S == x.size(0), "mmfast_cuda::adapter: x must hold mix.size(0) samples of S tokens");
  mmfast::AdapterShape s;
  s.M = x.size(0);
  s.S = S;
  s.D = D;
  s.R = static_cast<int>(R);
  s.E = static_cast<int>(E);
  s.G = static_cast<int>(groups);
  s.scale = static_cast<float>(scale);
  s.p_drop = static_cast<float>(p);
  s.keep_scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;
  TORCH_CHECK(mmfast::adapter_supported(s), "mmfast_cuda::adapter: unsupported shape (hidden ", s.R, " <= ",
              mmfast::kAdapterMaxHidden, ", experts ", s.E, " <= ", mmfast::kAdapterMaxExperts,
              ", groups dividing hidden and width, tokens * hidden < 2^31, dropout in [0, 1))");
  return s;
}

const int64_t* seed_ptr(const std::optional<Tensor>& seed, const Tensor& x, double p) {
  if (p <= 0) return nullptr;
  TORCH_CHECK(seed && seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == x.device(),
              "mmfast_cuda::adapter: dropout needs seed, a one-element int64 tensor on x's device");
  return seed->data_ptr<int64_t>();
}

std::tuple<Tensor, Tensor> adapter_fwd(const Tensor& x, const Tensor& down_w, const Tensor& down_b, const Tensor& up_w,
                                       const Tensor& up_b, const Tensor& mix, double scale, int64_t groups, double p,
                                       const std::optional<Tensor>& seed, int64_t S) {
  const c10::cuda::CUDAGuard guard(x.device());
  mmfast::AdapterFwdParams prm;
  prm.shape = adapter_shape(x, S, down_w, down_b, up_w, up_b, mix, groups, scale, p);
  const Tensor A = fp32(down_w), a = fp32(down_b), U = fp32(up_w), c = fp32(up_b), w = fp32(mix);
  Tensor y = at::empty({prm.shape.M, prm.shape.D}, x.options());
  Tensor z = at::empty({prm.shape.M, prm.shape.R}, x.options().dtype(at::kFloat));
  prm.x = x.data_ptr();
  prm.stride_x = row_stride(x);
  prm.down_w = A.data_ptr<float>();
  prm.down_b = a.data_ptr<float>();
  prm.up_w = U.data_ptr<float>();
  prm.up_b = c.data_ptr<float>();
  prm.mix = w.data_ptr<float>();
  prm.seed = seed_ptr(seed, x, p);
  prm.y = y.data_ptr();
  prm.z = z.data_ptr<float>();
  prm.act = to_dtype(x.scalar_type(), "x");
  check_cuda(mmfast::adapter_fwd(prm, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "adapter_fwd");
  return {y, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& z, const Tensor& down_w, const Tensor& up_w, const Tensor& up_b,
    const Tensor& mix, double scale, int64_t groups, double p, const std::optional<Tensor>& seed, int64_t S,
    bool need_dx, bool need_dw) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  mmfast::AdapterBwdParams prm;
  // the gradient of down_b is dz's column sum: a vector of the right shape stands in for it here
  prm.shape = adapter_shape(x, S, down_w, down_w.select(1, 0), up_w, up_b, mix, groups, scale, p);
  check_rows(dy, x, "dy");
  const mmfast::AdapterShape& s = prm.shape;
  TORCH_CHECK(z.device() == x.device() && z.scalar_type() == at::kFloat && z.is_contiguous() && z.dim() == 2 &&
                  z.size(0) == s.M && z.size(1) == s.R,
              "mmfast_cuda::adapter_bwd: z must be the forward's float32 [M, R] on x's device");
  const Tensor A = fp32(down_w), U = fp32(up_w), c = fp32(up_b), w = fp32(mix);
  const auto fopts = x.options().dtype(at::kFloat);
  const int64_t RG = s.R / s.G;
  Tensor dx = need_dx ? at::empty({s.M, s.D}, x.options()) : at::empty({0}, x.options());
  Tensor dz = at::empty({s.M, s.R}, fopts);
  const bool dropout = s.p_drop > 0.f;
  Tensor zd = need_dw && dropout ? at::empty({s.M, s.R}, fopts) : at::empty({0}, fopts);
  Tensor dmix_rows = at::empty({s.M, s.E}, fopts);
  prm.dy = dy.data_ptr();
  prm.stride_dy = row_stride(dy);
  prm.x = x.data_ptr();
  prm.stride_x = row_stride(x);
  prm.z = z.data_ptr<float>();
  prm.down_w = A.data_ptr<float>();
  prm.up_w = U.data_ptr<float>();
  prm.up_b = c.data_ptr<float>();
  prm.mix = w.data_ptr<float>();
  prm.seed = seed_ptr(seed, x, p);
  prm.dx = need_dx ? dx.data_ptr() : nullptr;
  prm.dz = dz.data_ptr<float>();
  prm.zd = need_dw && dropout ? zd.data_ptr<float>() : nullptr;
  prm.dmix_rows = dmix_rows.data_ptr<float>();
  prm.act = to_dtype(x.scalar_type(), "x");
  prm.need_dx = need_dx;
  prm.need_dw = need_dw;
  const int64_t P = mmfast::adapter_bwd_num_partials(prm);
  Tensor parts[3];
  const int64_t widths[3] = {s.R * s.D, s.E * s.D * RG, s.E * s.D};
  for (int i = 0; i < 3; ++i) parts[i] = need_dw ? at::empty({P, widths[i]}, fopts) : at::empty({0}, fopts);
  prm.da_partial = need_dw ? parts[0].data_ptr<float>() : nullptr;
  prm.du_partial = need_dw ? parts[1].data_ptr<float>() : nullptr;
  prm.dc_partial = need_dw ? parts[2].data_ptr<float>() : nullptr;
  check_cuda(mmfast::adapter_bwd(prm, stream), "adapter_bwd");

  Tensor grads[4] = {at::empty({0}, fopts), at::empty({0}, fopts), at::empty({0}, fopts), at::empty({0}, fopts)};
  if (need_dw) {
    const std::vector<int64_t> shapes[3] = {{s.R, s.D}, {s.E, s.D, RG}, {s.E, s.D}};
    Tensor sums[3];
    for (int i = 0; i < 3; ++i) {
      sums[i] = at::empty(shapes[i], fopts);
      check_cuda(mmfast::norm_sum_partials(parts[i].data_ptr<float>(), P, widths[i], sums[i].data_ptr(),
                                           mmfast::DType::kFloat32, stream),
                 "adapter_bwd (weight gradients)");
    }
    grads[0] = sums[0];
    grads[1] = dz.sum(0);
    grads[2] = sums[1];
    grads[3] = sums[2];
  }
  Tensor dmix = dmix_rows.view({s.M / S, S, s.E}).sum(1);
  return {dx, grads[0], grads[1], grads[2], grads[3], dmix};
}

Tensor adapter_keep_mask(const Tensor& seed, int64_t M, int64_t R, double p) {
  TORCH_CHECK(seed.is_cuda() && seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "mmfast_cuda::adapter_keep_mask: seed must be a one-element int64 CUDA tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  Tensor out = at::empty({M, R}, seed.options().dtype(at::kChar));
  check_cuda(mmfast::adapter_keep_mask(seed.data_ptr<int64_t>(), M, static_cast<int>(R), static_cast<float>(p),
                                       out.data_ptr<int8_t>(), c10::cuda::getCurrentCUDAStream(seed.device().index()).stream()),
             "adapter_keep_mask");
  return out.to(at::kBool);
}

std::string adapter_path(const Tensor& x, const Tensor& down_w, const Tensor& up_w, int64_t groups, bool backward) {
  // x stands in for every activation tensor (dy, y and dx are fresh contiguous tensors, like x's rows).
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "mmfast_cuda::adapter_path: x must be 2-D with rows");
  const c10::cuda::CUDAGuard guard(x.device());  // the path depends on x's device (SMs, shared memory)
  const Tensor mix = at::empty({1, up_w.size(0)}, x.options().dtype(at::kFloat));
  const Tensor up_b = at::empty({up_w.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  const mmfast::AdapterShape s = adapter_shape(x, x.size(0), down_w, down_w.select(1, 0), up_w, up_b, mix, groups, 1.0, 0.0);
  if (backward) {
    mmfast::AdapterBwdParams p;
    p.shape = s;
    p.dy = p.x = p.dx = x.data_ptr();
    p.stride_dy = p.stride_x = row_stride(x);
    p.act = to_dtype(x.scalar_type(), "x");
    p.need_dx = p.need_dw = true;
    return mmfast::adapter_bwd_path(p);
  }
  mmfast::AdapterFwdParams p;
  p.shape = s;
  p.x = p.y = x.data_ptr();
  p.stride_x = row_stride(x);
  p.act = to_dtype(x.scalar_type(), "x");
  return mmfast::adapter_fwd_path(p);
}

}  // namespace

TORCH_LIBRARY(mmfast_cuda, m) {
  m.def("norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? mean, Tensor rstd, Tensor? dresidual_out, "
        "bool rms, bool need_dx, bool need_dw, bool need_db, ScalarType? dw_dtype, ScalarType? db_dtype, "
        "int stages=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("norm_path(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, bool rms, bool backward, "
        "int stages=0) -> str");
  m.def("adapter_fwd(Tensor x, Tensor down_w, Tensor down_b, Tensor up_w, Tensor up_b, Tensor mix, float scale, "
        "int groups, float p, Tensor? seed, int S) -> (Tensor, Tensor)");
  m.def("adapter_bwd(Tensor dy, Tensor x, Tensor z, Tensor down_w, Tensor up_w, Tensor up_b, Tensor mix, "
        "float scale, int groups, float p, Tensor? seed, int S, bool need_dx, bool need_dw) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("adapter_keep_mask(Tensor seed, int M, int R, float p) -> Tensor");
  m.def("adapter_path(Tensor x, Tensor down_w, Tensor up_w, int groups, bool backward) -> str");
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("norm_path", &norm_path);
  m.impl("adapter_fwd", &adapter_fwd);
  m.impl("adapter_bwd", &adapter_bwd);
  m.impl("adapter_keep_mask", &adapter_keep_mask);
  m.impl("adapter_path", &adapter_path);
}

// A Python module to import (the ops above register when the library loads).
#define MMFAST_CAT2(a, b) a##b
#define MMFAST_CAT(a, b) MMFAST_CAT2(a, b)
#define MMFAST_STR2(a) #a
#define MMFAST_STR(a) MMFAST_STR2(a)

static PyModuleDef mmfast_cuda_module = {PyModuleDef_HEAD_INIT, MMFAST_STR(TORCH_EXTENSION_NAME),
                                         "mmfast CUDA C++ kernels (ops in torch.ops.mmfast_cuda)", -1, nullptr};

PyMODINIT_FUNC MMFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mmfast_cuda_module); }
