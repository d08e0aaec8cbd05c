"""Triton kernels for RMSNorm and LayerNorm, forward and backward, and their host launchers.

One family of kernels serves both norms (``IS_RMS`` is a compile-time switch), with or without the
pre-norm residual add and with or without affine parameters.

Contracts (see ``mmfast.ops.norm`` for the public functions):

* inputs are 2-D ``[M, N]`` views whose last dimension is contiguous; rows may be strided; the affine
  vectors and the statistics may have any strides (the launchers hand the kernels dense copies where
  they are not contiguous, as ``.contiguous()`` does);
* forward reads x (and the residual) once, writes y (and ``residual_out = x + residual``) once, and
  saves fp32 per-row statistics (``rstd``; ``mean`` for LayerNorm);
* RMSNorm rounds like HF ``LlamaRMSNorm`` (normalise in fp32, round to x's dtype, multiply by the
  weight, round again); LayerNorm like ``nn.LayerNorm`` (fp32 inside, one rounding at the end);
* backward reads x and dy once, writes dx once (plus the incoming gradient of ``residual_out``) and
  never writes dy; dweight/dbias come from a persistent grid whose programs keep fp32 partial sums in
  registers across all their rows, followed by one small, fixed-order reduction: no atomics, so the
  result is bit-identical run to run. With no affine gradient requested no affine work is done;
* rows wider than what fits in registers loop over column blocks (two passes over the row).

Every launch heuristic lives in the "launch configuration" section below.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import round_to as _round
from ._common import sum_partials as _sum_partials
from ._device import COMPILE_OPTIONS, cdiv, interpreting, next_pow2, on_tensor_device, resident_per_sm, sm_count

# ---------------------------------------------------------------------------------------------
# launch configuration (the one place for block sizes, warps and grid sizes)
# ---------------------------------------------------------------------------------------------

#: Widest row the forward keeps entirely in registers (wider rows take the two-pass path).
MAX_FUSED_N_FWD = 16384
#: fp32's largest finite value (a variance above it has overflowed)
FP32_MAX = tl.constexpr(3.4028234663852886e38)
#: Widest row the backward keeps entirely in registers.
MAX_FUSED_N_BWD = 8192
#: Column block of the two-pass (wide-row) kernels.
WIDE_BLOCK_N = 4096
#: Elements per tile the kernels aim for when several short rows share a program.
TILE_ELEMS = 4096
#: Most rows one tile holds.
MAX_BLOCK_M = 64


@dataclasses.dataclass(frozen=True)
class NormLaunch:
    """How one norm kernel is launched."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile (>= N unless ``wide``)
    num_warps: int
    wide: bool  # row does not fit: loop over column blocks
    programs: int  # grid size
    prefetch: bool = False  # backward: the next tile's x and dy are loaded before this tile's reductions
    keep_w: bool = True  # backward: the weight row stays in registers across tiles (else re-read, from L1)


@dataclasses.dataclass(frozen=True)
class NormTune:
    """A register-path launch choice for one width, measured on a GPU by benchmarks/tune_norm.py."""

    block_m: int
    num_warps: int
    per_sm: int = 0  # backward: persistent programs per SM (0: the heuristic's)
    prefetch: bool = False
    keep_w: bool = True


#: Measured choices that replace the heuristics below, keyed by
#: ``(direction, "rms" | "ln", N, "16bit" | "fp32")``. An entry enters only from a committed GPU run of
#: benchmarks/tune_norm.py (its results directory is named beside the entry).
TUNED: dict[tuple[str, str, int, str], NormTune] = {}


def _tuned(direction: str, rms: bool, N: int, dtype: torch.dtype | None) -> NormTune | None:
    if not TUNED or dtype is None:
        return None
    cls = "fp32" if dtype == torch.float32 else "16bit"
    return TUNED.get((direction, "rms" if rms else "ln", N, cls))


def _num_warps(tile_elems: int) -> int:
    if tile_elems >= 8192:
        return 16
    if tile_elems >= 2048:
        return 8
    return 4


def _tile(N: int, max_fused: int) -> tuple[int, int, bool]:
    if N > max_fused:
        return 1, WIDE_BLOCK_N, True
    block_n = max(16, next_pow2(N))
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMS // block_n))
    return block_m, block_n, False


def fwd_launch(M: int, N: int, rms: bool = True, dtype: torch.dtype | None = None) -> NormLaunch:
    block_m, block_n, wide = _tile(N, MAX_FUSED_N_FWD)
    num_warps = _num_warps(block_m * block_n)
    tune = None if wide else _tuned("fwd", rms, N, dtype)
    if tune is not None:
        block_m, num_warps = tune.block_m, tune.num_warps
    programs = M if wide else cdiv(M, block_m)
    return NormLaunch(block_m, block_n, num_warps, wide, programs)


def bwd_launch(M: int, N: int, device: torch.device, rms: bool = True, dtype: torch.dtype | None = None,
               resident: int | None = None) -> NormLaunch:
    """Persistent grid: at most a few programs per SM (32 warps' worth), never more than there are row
    tiles, and, given ``resident`` (how many programs of the compiled kernel one SM holds at once), no
    more than that per SM: the programs past it would run in a second, partly empty wave (at N = 4096 in
    bf16 the RMSNorm backward holds 80 registers a thread under Triton 3.9, so three of its 8-warp
    programs fit an SM, not four; 108 with fp32 weights under 3.6, so two). A measured ``TUNED``
    programs-per-SM stands as measured."""
    block_m, block_n, wide = _tile(N, MAX_FUSED_N_BWD)
    num_warps = _num_warps(block_m * block_n)
    prefetch, keep_w = False, True
    tune = None if wide else _tuned("bwd", rms, N, dtype)
    if tune is not None:
        block_m, num_warps, prefetch, keep_w = tune.block_m, tune.num_warps, tune.prefetch, tune.keep_w
    per_sm = max(1, 32 // num_warps)
    if tune is not None and tune.per_sm:
        per_sm = tune.per_sm
    elif resident:
        per_sm = min(per_sm, resident)
    tiles = cdiv(M, block_m)
    programs = max(1, min(tiles, sm_count(device) * per_sm))
    return NormLaunch(block_m, block_n, num_warps, wide, programs, prefetch, keep_w)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_input(X, R, x_off, r_off, cols, mask, dtype: tl.constexpr, HAS_RES: tl.constexpr, SOFT_RNE: tl.constexpr):
    """The normalised input, in fp32: x, or x + residual rounded to x's dtype (R may be None)."""
    x = tl.load(X + x_off + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r_off + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype, SOFT_RNE).to(tl.float32)
    return x


@triton.jit
def _norm_fwd_kernel(
    X, stride_x, R, stride_r, W, B, Y, RES_OUT, MEAN, RSTD,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    """A tile of BLOCK_M whole rows per program, each row read once."""
    dtype = Y.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    out_offs = rows[:, None] * N + cols[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = _round(x + r, dtype, SOFT_RNE)
        tl.store(RES_OUT + out_offs, h, mask=mask)
        x = h.to(tl.float32)

    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        tl.store(MEAN + rows, mean, mask=row_mask)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = tl.rsqrt(var + eps)
    if not IS_RMS:  # a variance past fp32's range would make every y the bias: NaN, as PyTorch's
        rstd = tl.where(var > FP32_MAX, float("nan"), rstd)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    y = xc * rstd[:, None]
    if IS_RMS:
        y = _round(y, dtype, SOFT_RNE).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + out_offs, _round(y, dtype, SOFT_RNE), mask=mask)


@triton.jit
def _norm_fwd_wide_kernel(
    X, stride_x, R, stride_r, W, B, Y, RES_OUT, MEAN, RSTD,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    """One row per program, two passes over column blocks: statistics, then normalise.

    LayerNorm statistics: each column block's mean and sum of squared deviations are exact (the block
    is in registers), and blocks merge with Chan's parallel formula, so no sum-of-squares cancellation
    whatever the row's mean.
    """
    dtype = Y.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    x_off = row * stride_x
    r_off = row * stride_r
    out_row = row * N

    acc_ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        x = _load_input(X, R, x_off, r_off, cols, m, dtype, HAS_RES, SOFT_RNE)
        if HAS_RES:
            tl.store(RES_OUT + out_row + cols, x.to(dtype), mask=m)  # exact: x holds x + r rounded
        if IS_RMS:
            acc_ss += x * x
        else:
            n_seen = start * 1.0
            n_blk = tl.minimum(N - start, BLOCK_N) * 1.0
            blk_mean = tl.sum(x, axis=0) / n_blk
            d = tl.where(m, x - blk_mean, 0.0)
            delta = blk_mean - mean
            n_all = n_seen + n_blk
            mean += delta * (n_blk / n_all)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (n_seen * n_blk / n_all)
    if IS_RMS:
        var = tl.sum(acc_ss, axis=0) / N
    else:
        var = m2 / N
        tl.store(MEAN + row, mean)
    rstd = tl.rsqrt(var + eps)
    if not IS_RMS:  # a variance past fp32's range would make every y the bias: NaN, as PyTorch's
        rstd = tl.where(var > FP32_MAX, float("nan"), rstd)
    tl.store(RSTD + row, rstd)

    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        x = _load_input(X, R, x_off, r_off, cols, m, dtype, HAS_RES, SOFT_RNE)
        y = (x - mean) * rstd
        if IS_RMS:
            y = _round(y, dtype, SOFT_RNE).to(tl.float32)
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + out_row + cols, _round(y, dtype, SOFT_RNE), mask=m)


@triton.jit
def _norm_bwd_kernel(
    DY, stride_dy, X, stride_x, W, MEAN, RSTD, DRES, stride_dres, DX, DW_PART, DB_PART,
    M, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DRES: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr,
    PREFETCH: tl.constexpr = False, KEEP_W: tl.constexpr = True,
):
    """Persistent: program p handles row tiles p, p + P, p + 2P, ... and keeps its dweight/dbias
    partial sums in registers until the end, then writes one row of partials.

    ``PREFETCH``: the next tile's x and dy are loaded (in their storage dtype) before this tile's row
    reductions, so a program has two tiles of loads in flight instead of waiting at each tile start.
    ``KEEP_W``: the weight row is read once and kept in registers; otherwise each tile re-reads it
    (an L1 hit), which frees registers for more resident programs."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W and KEEP_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if NEED_DW:
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if NEED_DB:
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    num_tiles = tl.cdiv(M, BLOCK_M)
    if PREFETCH:
        rows_next = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_next = (rows_next < M)[:, None] & col_mask[None, :]
        x_next = tl.load(X + rows_next[:, None] * stride_x + cols[None, :], mask=mask_next, other=0.0)
        dy_next = tl.load(DY + rows_next[:, None] * stride_dy + cols[None, :], mask=mask_next, other=0.0)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            rows_next = rows + nprog * BLOCK_M  # past the last tile the mask is empty: nothing is read
            mask_next = (rows_next < M)[:, None] & col_mask[None, :]
            x_next = tl.load(X + rows_next[:, None] * stride_x + cols[None, :], mask=mask_next, other=0.0)
            dy_next = tl.load(DY + rows_next[:, None] * stride_dy + cols[None, :], mask=mask_next, other=0.0)
        else:
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
        if NEED_DX:
            if HAS_W:
                if KEEP_W:
                    wdy = dy * w[None, :]
                else:
                    wdy = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            else:
                wdy = dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            if IS_RMS:
                dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * N + cols[None, :], _round(dx, DX.dtype.element_ty, SOFT_RNE), mask=mask)

    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _norm_bwd_rowdot_kernel(
    DY, stride_dy, X, stride_x, W, MEAN, RSTD, C,
    N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Wide rows, first pass: C[row] = (mean(xhat * w * dy), mean(w * dy)) over the row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(MEAN + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            dy = dy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (x - mean) * rstd, 0.0)
        acc1 += xhat * dy
        acc2 += dy
    tl.store(C + 2 * row, tl.sum(acc1, axis=0) / N)
    tl.store(C + 2 * row + 1, tl.sum(acc2, axis=0) / N)


@triton.jit
def _norm_bwd_wide_kernel(
    DY, stride_dy, X, stride_x, W, MEAN, RSTD, C, DRES, stride_dres, DX, DW_PART, DB_PART,
    M, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DRES: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    """Wide rows, second pass, persistent: for each column block, program p walks rows p, p + P, ...
    writing dx and keeping that block's dweight/dbias partials in registers."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid.to(tl.int64), M, nprog):  # an int64 row index: 64-bit offsets
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(m, (x - tl.load(MEAN + row)) * rstd, 0.0)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
            if NEED_DX:
                if HAS_W:
                    wdy = dy * w
                else:
                    wdy = dy
                c1 = tl.load(C + 2 * row)
                if IS_RMS:
                    dx = (wdy - xhat * c1) * rstd
                else:
                    dx = (wdy - (xhat * c1 + tl.load(C + 2 * row + 1))) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + row * N + cols, _round(dx, DX.dtype.element_ty, SOFT_RNE), mask=m)
        if NEED_DW:
            tl.store(DW_PART + pid * N + cols, dw_acc, mask=m)
        if NEED_DB:
            tl.store(DB_PART + pid * N + cols, db_acc, mask=m)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


@on_tensor_device
def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Forward of RMSNorm (``rms=True``) or LayerNorm over rows of ``x`` ([M, N], unit column stride).

    Returns ``(y, residual_out, mean, rstd)``; ``residual_out`` is None without a residual and
    ``mean`` is None for RMSNorm. ``y`` and ``residual_out`` are contiguous, in x's dtype.
    """
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty((M, N), dtype=x.dtype, device=x.device) if residual is not None else None
    mean = None if rms else torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, res_out, mean, rstd
    weight = None if weight is None else weight.contiguous()  # the kernels read affine vectors densely
    bias = None if bias is None else bias.contiguous()
    cfg = fwd_launch(M, N, rms, x.dtype)
    args = (
        x, x.stride(0), residual, _row_stride(residual), weight, bias, y, res_out, mean, rstd,
        M, N, float(eps),
    )
    flags = dict(
        IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
        BLOCK_N=cfg.block_n, SOFT_RNE=interpreting(), num_warps=cfg.num_warps, **COMPILE_OPTIONS,
    )
    if cfg.wide:
        _norm_fwd_wide_kernel[(cfg.programs,)](*args, **flags)
    else:
        _norm_fwd_kernel[(cfg.programs,)](*args, BLOCK_M=cfg.block_m, **flags)
    return y, res_out, mean, rstd


def bwd_grid(M: int, N: int, device: torch.device, rms: bool, x_dtype: torch.dtype, dy_dtype: torch.dtype,
             w_dtype: torch.dtype | None, need_dx: bool, need_dw: bool, need_db: bool,
             dres_dtype: torch.dtype | None = None) -> tuple[NormLaunch, dict]:
    """The backward's launch for [M, N] rows of these dtypes and gradients (``dres_dtype``: the residual's
    gradient, added to dx), and its kernel's flags. The persistent grid holds no more programs per SM than
    one SM holds of the compiled kernel at once (:func:`bwd_launch`); that is asked of the contiguous
    layout's compile (dtypes standing in for the tensors: Triton's warmup takes them as 16-byte aligned
    ones, rows N apart), so that the grid, and with it the order dweight's partials are summed in, is the
    same whatever the layout of x, dy and the residual's gradient."""
    cfg = bwd_launch(M, N, device, rms, x_dtype)
    has_dres = need_dx and dres_dtype is not None
    flags = dict(
        IS_RMS=rms, HAS_W=w_dtype is not None, HAS_DRES=has_dres,
        NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_N=cfg.block_n, SOFT_RNE=interpreting(), num_warps=cfg.num_warps, **COMPILE_OPTIONS,
    )
    if not cfg.wide:
        flags.update(BLOCK_M=cfg.block_m, PREFETCH=cfg.prefetch, KEEP_W=cfg.keep_w)
    if cfg.programs > sm_count(device):  # (one program per SM always fits)
        f32 = torch.float32
        kernel = _norm_bwd_wide_kernel if cfg.wide else _norm_bwd_kernel
        wide_c = (f32 if need_dx else None,) if cfg.wide else ()
        resident = resident_per_sm(kernel, device, (
            dy_dtype, N, x_dtype, N, w_dtype, None if rms else f32, f32, *wide_c, dres_dtype if has_dres else None,
            N if has_dres else 0, x_dtype if need_dx else None, f32 if need_dw else None, f32 if need_db else None,
            M, N), flags)
        cfg = bwd_launch(M, N, device, rms, x_dtype, resident)
    return cfg, flags


@on_tensor_device
def norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    rms: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    dw_dtype: torch.dtype | None = None,
    db_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`norm_fwd`. ``x`` is the normalised input (``residual_out`` when a residual
    was added); ``dresidual_out`` is the gradient flowing into ``residual_out``, added to dx.

    Returns ``(dx, dweight, dbias)``, each None when not requested. dx is contiguous in x's dtype.
    """
    M, N = x.shape
    dev = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=dev) if need_dx else None
    if need_dw and weight is None:
        raise ValueError("need_dw requires a weight")
    dw = torch.empty(N, dtype=dw_dtype or weight.dtype, device=dev) if need_dw else None
    db = torch.empty(N, dtype=db_dtype or dw_dtype or x.dtype, device=dev) if need_db else None
    if M == 0 or not (need_dx or need_dw or need_db):
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db

    weight = None if weight is None else weight.contiguous()  # and the statistics, one float per row
    mean = None if mean is None else mean.contiguous()
    rstd = rstd.contiguous()
    has_dres = need_dx and dresidual_out is not None
    dres = dresidual_out if has_dres else None
    cfg, flags = bwd_grid(M, N, dev, rms, x.dtype, dy.dtype, None if weight is None else weight.dtype,
                          need_dx, need_dw, need_db, dres.dtype if has_dres else None)
    P = cfg.programs
    dw_part = torch.empty((P, N), dtype=torch.float32, device=dev) if need_dw else None
    db_part = torch.empty((P, N), dtype=torch.float32, device=dev) if need_db else None
    if cfg.wide:
        c = None
        if need_dx:
            c = torch.empty((M, 2), dtype=torch.float32, device=dev)
            _norm_bwd_rowdot_kernel[(M,)](
                dy, dy.stride(0), x, x.stride(0), weight, mean, rstd, c, N,
                IS_RMS=rms, HAS_W=weight is not None, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, **COMPILE_OPTIONS,
            )
        _norm_bwd_wide_kernel[(P,)](
            dy, dy.stride(0), x, x.stride(0), weight, mean, rstd, c, dres, _row_stride(dres),
            dx, dw_part, db_part, M, N, **flags,
        )
    else:
        _norm_bwd_kernel[(P,)](
            dy, dy.stride(0), x, x.stride(0), weight, mean, rstd, dres, _row_stride(dres),
            dx, dw_part, db_part, M, N, **flags,
        )
    if need_dw:
        _sum_partials(dw_part, dw)
    if need_db:
        _sum_partials(db_part, db)
    return dx, dw, db
