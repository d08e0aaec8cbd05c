// Registers the CUDA norm kernels as torch ops in the `mmfast_cuda` namespace.
//
// The kernels (norm_fwd.cu, norm_bwd.cu) know nothing of torch; this file allocates outputs and
// workspaces with the caching allocator, picks the current stream and device, and maps dtypes. The
// autograd and the public functions stay in mmfast.ops.norm, which calls these ops for its `cuda` backend.
//
//   mmfast_cuda::norm_fwd(x, weight, bias, residual, eps, rms) -> (y, residual_out, mean, rstd)
//   mmfast_cuda::norm_bwd(dy, x, weight, mean, rstd, dresidual_out, rms, need_dx, need_dw, need_db,
//                         dw_dtype, db_dtype, stages=0) -> (dx, dweight, dbias)
//   mmfast_cuda::norm_path(x, weight, bias, residual, rms, backward, stages=0) -> str   (which kernel runs)
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

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.stride(0) == 1, "mmfast_cuda: ", what,
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
  p.mean = mean ? mean->data_ptr<float>() : nullptr;
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
  TORCH_CHECK(rms || (mean && mean->numel() == x.size(0)), "mmfast_cuda::norm_bwd: LayerNorm needs mean");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0) && rstd.is_contiguous(),
              "mmfast_cuda::norm_bwd: rstd must be float32 [M]");
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
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("norm_path", &norm_path);
}

// A Python module to import (the ops above register when the library loads).
#define MMFAST_CAT2(a, b) a##b
#define MMFAST_CAT(a, b) MMFAST_CAT2(a, b)
#define MMFAST_STR2(a) #a
#define MMFAST_STR(a) MMFAST_STR2(a)

static PyModuleDef mmfast_cuda_module = {PyModuleDef_HEAD_INIT, MMFAST_STR(TORCH_EXTENSION_NAME),
                                         "mmfast CUDA C++ kernels (ops in torch.ops.mmfast_cuda)", -1, nullptr};

PyMODINIT_FUNC MMFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mmfast_cuda_module); }
