// A C interface to the norm and adapter kernels of csrc/ built for the CPU emulator, for ctypes (tests/cuda_emulator.py).
// Flat arguments instead of the parameter structs, so that Python needs no copy of their layout.
#include <cstdint>

#include "cuda_emu.h"
#include "adapter.h"
#include "norm.h"

extern "C" {

static mmfast::NormFwdParams fwd_params(const void* x, const void* residual, const void* weight, const void* bias,
                                        void* y, void* residual_out, float* mean, float* rstd, int64_t M, int64_t N,
                                        int64_t stride_x, int64_t stride_res, int act, int wdt, float eps, int rms) {
  mmfast::NormFwdParams p;
  p.x = x;
  p.residual = residual;
  p.weight = weight;
  p.bias = bias;
  p.y = y;
  p.residual_out = residual_out;
  p.mean = mean;
  p.rstd = rstd;
  p.M = M;
  p.N = N;
  p.stride_x = stride_x;
  p.stride_res = stride_res;
  p.act = static_cast<mmfast::DType>(act);
  p.wdt = static_cast<mmfast::DType>(wdt);
  p.eps = eps;
  p.rms = rms != 0;
  return p;
}

int emu_norm_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                 void* residual_out, float* mean, float* rstd, int64_t M, int64_t N, int64_t stride_x,
                 int64_t stride_res, int act, int wdt, float eps, int rms) {
  const auto p = fwd_params(x, residual, weight, bias, y, residual_out, mean, rstd, M, N, stride_x, stride_res, act,
                            wdt, eps, rms);
  const cudaError_t e = mmfast::norm_fwd(p, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

const char* emu_norm_fwd_path(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                              void* residual_out, int64_t M, int64_t N, int64_t stride_x, int64_t stride_res, int act,
                              int wdt, int rms) {
  return mmfast::norm_fwd_path(fwd_params(x, residual, weight, bias, y, residual_out, nullptr, nullptr, M, N,
                                          stride_x, stride_res, act, wdt, 0.f, rms));
}

static mmfast::NormBwdParams bwd_params(const void* dy, const void* x, const void* weight, const float* mean,
                                        const float* rstd, const void* dres, void* dx, float* dw_partial,
                                        float* db_partial, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_x,
                                        int64_t stride_dres, int act, int wdt, int rms, int need_dx, int need_dw,
                                        int need_db, int stages) {
  mmfast::NormBwdParams p;
  p.dy = dy;
  p.x = x;
  p.weight = weight;
  p.mean = mean;
  p.rstd = rstd;
  p.dres = dres;
  p.dx = dx;
  p.dw_partial = dw_partial;
  p.db_partial = db_partial;
  p.M = M;
  p.N = N;
  p.stride_dy = stride_dy;
  p.stride_x = stride_x;
  p.stride_dres = stride_dres;
  p.act = static_cast<mmfast::DType>(act);
  p.wdt = static_cast<mmfast::DType>(wdt);
  p.rms = rms != 0;
  p.need_dx = need_dx != 0;
  p.need_dw = need_dw != 0;
  p.need_db = need_db != 0;
  p.stages = stages;
  return p;
}

#define MMFAST_BWD_ARGS                                                                                           \
  const void *dy, const void *x, const void *weight, const float *mean, const float *rstd, const void *dres,     \
      void *dx, float *dw_partial, float *db_partial, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_x, \
      int64_t stride_dres, int act, int wdt, int rms, int need_dx, int need_dw, int need_db, int stages
#define MMFAST_BWD_PASS                                                                                       \
  dy, x, weight, mean, rstd, dres, dx, dw_partial, db_partial, M, N, stride_dy, stride_x, stride_dres, act, wdt, \
      rms, need_dx, need_dw, need_db, stages

int64_t emu_norm_bwd_num_partials(MMFAST_BWD_ARGS) {
  return mmfast::norm_bwd_num_partials(bwd_params(MMFAST_BWD_PASS));
}

int emu_norm_bwd(MMFAST_BWD_ARGS) {
  const cudaError_t e = mmfast::norm_bwd(bwd_params(MMFAST_BWD_PASS), nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

const char* emu_norm_bwd_path(MMFAST_BWD_ARGS) { return mmfast::norm_bwd_path(bwd_params(MMFAST_BWD_PASS)); }

int emu_norm_sum_partials(float* partial, int64_t P, int64_t N, void* out, int out_dt) {
  const cudaError_t e = mmfast::norm_sum_partials(partial, P, N, out, static_cast<mmfast::DType>(out_dt), nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// ---- the adapter -------------------------------------------------------------------------------------

static mmfast::AdapterShape adapter_shape(int64_t M, int64_t S, int64_t D, int R, int E, int G, float scale,
                                          float p_drop, float keep_scale) {
  mmfast::AdapterShape s;
  s.M = M;
  s.S = S;
  s.D = D;
  s.R = R;
  s.E = E;
  s.G = G;
  s.scale = scale;
  s.p_drop = p_drop;
  s.keep_scale = keep_scale;
  return s;
}

#define MMFAST_ADAPTER_FWD_ARGS                                                                                 \
  const void *x, int64_t stride_x, const float *A, const float *a, const float *U, const float *c,              \
      const float *mix, const int64_t *seed, void *y, float *z, int64_t M, int64_t S, int64_t D, int R, int E, \
      int G, float scale, float p_drop, float keep_scale, int act

static mmfast::AdapterFwdParams adapter_fwd_params(MMFAST_ADAPTER_FWD_ARGS) {
  mmfast::AdapterFwdParams p;
  p.shape = adapter_shape(M, S, D, R, E, G, scale, p_drop, keep_scale);
  p.x = x;
  p.stride_x = stride_x;
  p.down_w = A;
  p.down_b = a;
  p.up_w = U;
  p.up_b = c;
  p.mix = mix;
  p.seed = seed;
  p.y = y;
  p.z = z;
  p.act = static_cast<mmfast::DType>(act);
  return p;
}

#define MMFAST_ADAPTER_FWD_PASS x, stride_x, A, a, U, c, mix, seed, y, z, M, S, D, R, E, G, scale, p_drop, keep_scale, act

int emu_adapter_fwd(MMFAST_ADAPTER_FWD_ARGS) {
  const cudaError_t e = mmfast::adapter_fwd(adapter_fwd_params(MMFAST_ADAPTER_FWD_PASS), nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

const char* emu_adapter_fwd_path(MMFAST_ADAPTER_FWD_ARGS) {
  return mmfast::adapter_fwd_path(adapter_fwd_params(MMFAST_ADAPTER_FWD_PASS));
}

#define MMFAST_ADAPTER_BWD_ARGS                                                                                     \
  const void *dy, int64_t stride_dy, const void *x, int64_t stride_x, const float *z, const float *A,              \
      const float *U, const float *c, const float *mix, const int64_t *seed, void *dx, float *dz, float *zd,       \
      float *dmix_rows, float *da_part, float *du_part, float *dc_part, int64_t M, int64_t S, int64_t D, int R, \
      int E, int G, float scale, float p_drop, float keep_scale, int act, int need_dx, int need_dw
#define MMFAST_ADAPTER_BWD_PASS                                                                                  \
  dy, stride_dy, x, stride_x, z, A, U, c, mix, seed, dx, dz, zd, dmix_rows, da_part, du_part, dc_part, M, S, D, R, \
      E, G, scale, p_drop, keep_scale, act, need_dx, need_dw

static mmfast::AdapterBwdParams adapter_bwd_params(MMFAST_ADAPTER_BWD_ARGS) {
  mmfast::AdapterBwdParams p;
  p.shape = adapter_shape(M, S, D, R, E, G, scale, p_drop, keep_scale);
  p.dy = dy;
  p.stride_dy = stride_dy;
  p.x = x;
  p.stride_x = stride_x;
  p.z = z;
  p.down_w = A;
  p.up_w = U;
  p.up_b = c;
  p.mix = mix;
  p.seed = seed;
  p.dx = dx;
  p.dz = dz;
  p.zd = zd;
  p.dmix_rows = dmix_rows;
  p.da_partial = da_part;
  p.du_partial = du_part;
  p.dc_partial = dc_part;
  p.act = static_cast<mmfast::DType>(act);
  p.need_dx = need_dx != 0;
  p.need_dw = need_dw != 0;
  return p;
}

int64_t emu_adapter_bwd_num_partials(MMFAST_ADAPTER_BWD_ARGS) {
  return mmfast::adapter_bwd_num_partials(adapter_bwd_params(MMFAST_ADAPTER_BWD_PASS));
}

int emu_adapter_bwd(MMFAST_ADAPTER_BWD_ARGS) {
  const cudaError_t e = mmfast::adapter_bwd(adapter_bwd_params(MMFAST_ADAPTER_BWD_PASS), nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

const char* emu_adapter_bwd_path(MMFAST_ADAPTER_BWD_ARGS) {
  return mmfast::adapter_bwd_path(adapter_bwd_params(MMFAST_ADAPTER_BWD_PASS));
}

int emu_adapter_keep_mask(const int64_t* seed, int64_t M, int R, float p_drop, int8_t* out) {
  const cudaError_t e = mmfast::adapter_keep_mask(seed, M, R, p_drop, out, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

void emu_adapter_limits(int* hidden, int* experts) {
  *hidden = mmfast::kAdapterMaxHidden;
  *experts = mmfast::kAdapterMaxExperts;
}

// ---- emulator control ----------------------------------------------------------------------------------

void emu_set_copy_mode(int eager) { mmfast_emu::set_copy_mode(eager != 0); }
void* emu_alloc_fenced(int64_t bytes, int align) {
  return mmfast_emu::alloc_fenced(static_cast<size_t>(bytes), static_cast<size_t>(align));
}
int64_t emu_fenced_offset(const void* data) { return static_cast<int64_t>(mmfast_emu::fenced_offset(data)); }
int emu_in_fence(const void* p) { return mmfast_emu::in_fence(p) ? 1 : 0; }
void emu_free_fenced(void* data) { mmfast_emu::free_fenced(data); }
int emu_select_device(int dev) { return mmfast_emu::select_device(dev) ? 1 : 0; }
int emu_device_props(int dev, int* sm_count, int* smem_optin) {
  mmfast_emu::DeviceProps d;
  if (!mmfast_emu::device_props(dev, &d)) return 0;
  *sm_count = d.sm_count;
  *smem_optin = d.smem_optin;
  return 1;
}
const char* emu_take_fault() { return mmfast_emu::take_fault(); }
const char* emu_error_string(int e) { return cudaGetErrorString(static_cast<cudaError_t>(e)); }
int emu_last_error() { return cudaGetLastError(); }

}  // extern "C"
