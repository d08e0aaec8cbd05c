"""Triton kernels for the Mixture-of-Modality adapter (METHODS.md, section 2), and their launchers.

For tokens x [M, D] (M = B * S, sample b = row // S), router weights mix [B, E] and:

    z  = x A^T + a                          A [R, D], a [R]                 (fp32, saved for backward)
    zd = dropout(z)                         mask from (seed, row * R + j), regenerated in backward
    y  = x + s * sum_e mix[b, e] * (zd ._G U_e^T + c_e)       U [E, D, R/G], c [E, D]

``._G`` is the grouped up-projection: output channel d (group g = d // (D/G)) reads hidden channels
[g R/G, (g+1) R/G).

The experts and their biases fold into one product per column chunk over an "extended hidden" axis
k = e * RX + j (RX a power of two > R): slot j < R is hidden channel j of expert e, slot j = R is
expert e's bias. On the row side, h[m, e * RX + j] = mix[b(m), e] * zd[m, j] with a 1 in place of
zd at slot R; on the weight side, W[e * RX + j, d] = U_e[d, j - g(d) R/G] inside column d's group,
c_e[d] at slot R, 0 elsewhere. Then

    y      = x + s * h W                    (one [BLOCK_M, E RX] x [E RX, BLOCK_D] product per chunk)
    T      = dy W^T                         [M, E RX]: dy ._G U_e at the hidden slots, dy . c_e at slot R
    d zd   = s * sum_e mix_e T_e            d mix_e = s * sum_j h-row-of-e . T_e  (the bias slot included)
    dW     = s * h^T dy                     (dU in the hidden slots, dc in the bias slot)

so every chunk is one tensor-core product whose accumulator stays in the product's layout. W is
packed densely once per call (``_pack_w_kernel``, [E RX, D] in x's dtype, a few hundred KB) so the
hot loops load it like any other tile. The router weight enters h rounded to x's dtype; slot R + 1
carries what that rounding dropped (W holds c there too), so the bias terms of y and dc keep its
precision.

Products run in x's dtype on the tensor cores (fp32 inputs: exact fp32), with fp32 accumulation.
fp32 weights (master weights) with 16-bit x are split into their x-dtype part and the remainder
(two products), so that U and c keep fp32 precision in y, d zd and d mix.

Forward: one kernel; a tile of rows is read twice, chunk by chunk (for z, then for y); the tile is
small enough (BLOCK_M rows) that the second read mostly hits L2. Backward: a row kernel reads dy once
for d(z) and the router-weight gradient per row; a column kernel reads x and dy once, writes dx and
keeps dA and dW partials in registers for its column chunk over its rows; one fixed-order reduction
finishes them (deterministic).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import round_to, sum_partials
from ._device import COMPILE_OPTIONS, cdiv, interpreting, next_pow2, on_tensor_device, sm_count

# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdapterLaunch:
    block_m: int  # rows per tile (tl.dot needs at least 16)
    block_d: int  # column chunk
    num_warps: int
    num_stages: int = 3  # software-pipelining depth of the chunk / row-tile loop
    programs_per_sm: int = 4  # column kernel: persistent programs per SM (all column chunks together)


KERNELS = ("fwd", "rows", "cols")

# Tile shapes per kernel. At the usual adapter sizes (hidden 8, two experts) none spills registers on
# sm_90 beyond the 16 B of stack ptxas leaves in the column kernel with dropout under Triton 3.6
# (``python -m mmfast.kernels.compile_check``); :func:`fit` shrinks them for wide hidden x many experts
# so that they still launch and fit the registers. 16-bit inputs use the tensor cores;
# fp32 inputs use exact fp32 products, which take more registers, so a shorter tile.
# ``benchmarks/tune_adapter.py`` times alternatives on a GPU.
_DEFAULT = {"16bit": AdapterLaunch(32, 64, 8), "fp32": AdapterLaunch(16, 64, 8)}
# Per (dtype class, kernel) choices measured on a GPU; a missing entry takes the default.
TUNED: dict[tuple[str, str], AdapterLaunch] = {}


def launch_config(dtype: torch.dtype, kernel: str = "fwd") -> AdapterLaunch:
    """Tile shape of ``kernel`` (one of :data:`KERNELS`) for activations of ``dtype``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    cls = "fp32" if dtype == torch.float32 else "16bit"
    return TUNED.get((cls, kernel), _DEFAULT[cls])


def hidden_pad(R: int) -> int:
    """Hidden width padded for tl.dot (at least 16, a power of two)."""
    return max(16, next_pow2(R))


def slots(R: int) -> int:
    """RX: slots per expert on the extended hidden axis (R hidden channels, the bias slot R and slot
    R + 1, which carries the router weight's remainder after rounding to x's dtype)."""
    return max(16, next_pow2(R + 2))


SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined tiles may take (sm_90 has 227 KB)


#: Bytes of an [EK, block_d] tile in x's dtype per warp that a kernel can hold in registers without
#: spilling: the forward and row kernels hold a product's operand of that shape, the column kernel its
#: dW partials (fp32) besides the x and dy tiles, so half as much. Past :data:`WIDE_EK` extended slots
#: the row tiles narrow to 16 rows as well. From the sm_90 compile check at D = 4096 (Triton 3.6 and
#: 3.9): up to 512 slots (experts x hidden + 2 rounded up to a power of two; measured: hidden 8-128 with 2
#: experts, 8-64 with 4, 16 with 8) no kernel spills more than 16 B a thread, where
#: twice these budgets spilled up to 928 B (forward) and 1.6 KB (column kernel, fp32 x). At 1024 slots
#: (hidden 128 x 4, hidden 64 x 8) 16-bit x with 16-bit weights spills at most 32 B; with fp32 weights
#: (two planes of W) the forward still spills about 0.5 KB, and with fp32 x the column kernel about
#: 0.65 KB under Triton 3.9: correct, slower. tests/test_compile_check.py holds the compile check's
#: adapter shapes, 1024 slots of 16-bit x and weights among them, to 16 B.
REG_TILE_BYTES = {"fwd": 4096, "rows": 4096, "cols": 2048}
WIDE_EK = 512


def fit(cfg: AdapterLaunch, EK: int, planes: int, elt: int, kernel: str) -> AdapterLaunch:
    """``cfg`` with fewer pipeline stages, then narrower column chunks, until one stage's tiles (the
    packed weights, ``planes`` of [EK, block_d], and a [block_m, block_d] activation tile) times the
    stages fit :data:`SMEM_BUDGET` (wide hidden x many experts would otherwise not launch), and
    ``kernel``'s [EK, block_d] tile fits the registers (:data:`REG_TILE_BYTES`; no narrower than 16
    columns), with row tiles of 16 past :data:`WIDE_EK` extended slots. At the usual sizes (hidden 8,
    two experts) none of this shrinks anything."""
    if EK > WIDE_EK and cfg.block_m > 16:
        cfg = dataclasses.replace(cfg, block_m=16)
    while cfg.num_stages > 1 and smem_bytes(cfg, EK, planes, elt) > SMEM_BUDGET:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while cfg.block_d > 16 and (smem_bytes(cfg, EK, planes, elt) > SMEM_BUDGET
                                or EK * cfg.block_d * elt > REG_TILE_BYTES[kernel] * cfg.num_warps):
        cfg = dataclasses.replace(cfg, block_d=cfg.block_d // 2)
    return cfg


def smem_bytes(cfg: AdapterLaunch, EK: int, planes: int, elt: int) -> int:
    """Shared memory the pipelined tiles of ``cfg`` take (:func:`fit`)."""
    return (planes * EK + cfg.block_m) * cfg.block_d * elt * cfg.num_stages


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit inputs: the precision flag is moot


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(SEED, rows, hid, R: tl.constexpr, p_drop):
    """Dropout keep mask of hidden activations (row, j); the same (seed, offset) stream everywhere."""
    seed = tl.load(SEED)
    return tl.rand(seed, rows[:, None] * R + hid[None, :]) >= p_drop


@triton.jit
def _pack_w_kernel(U, C, WP, D, DG, R: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                   RX: tl.constexpr, SPLIT_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """W (module docstring) packed densely once per call, WP [EP * RX, D] in x's dtype:
    U_e[d, j - g(d) RG] at hidden slots j of column d's group g(d) = d // DG, c_e[d] at slots R and
    R + 1, 0 elsewhere and for padded experts. With SPLIT_W (fp32 weights, 16-bit x) a second plane
    WP[EP * RX:] holds what the cast to x's dtype dropped."""
    dt = WP.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    k = tl.arange(0, EP * RX)
    e = k // RX
    j = k % RX
    g = cols // DG
    jl = j[:, None] - (g * RG)[None, :]
    live = (e < E)[:, None] & cmask[None, :]
    umask = live & (j < R)[:, None] & (jl >= 0) & (jl < RG)
    u = tl.load(U + e[:, None] * (D * RG) + cols[None, :].to(tl.int64) * RG + jl, mask=umask, other=0.0)
    c = tl.load(C + tl.minimum(e, E - 1)[:, None] * D + cols[None, :], mask=cmask[None, :], other=0.0)
    w = u.to(tl.float32) + tl.where(live & ((j == R) | (j == R + 1))[:, None], c.to(tl.float32), 0.0)
    hi = w.to(dt)
    out = WP + k[:, None] * D + cols[None, :]
    tl.store(out, hi, mask=cmask[None, :])
    if SPLIT_W:
        tl.store(out + EP * RX * D, (w - hi.to(tl.float32)).to(dt), mask=cmask[None, :])


@triton.jit
def _w_tile(WP, plane: tl.constexpr, cols, cmask, D, EK: tl.constexpr):
    """Plane ``plane`` of the packed W for a column chunk: [EK, BLOCK_D] in x's dtype."""
    k = tl.arange(0, EK)
    return tl.load(WP + plane * EK * D + k[:, None] * D + cols[None, :], mask=cmask[None, :], other=0.0)


@triton.jit
def _mixed_rows(zd, MIX, sample, rmask, R: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                RX: tl.constexpr, BLOCK_M: tl.constexpr, dt: tl.constexpr):
    """(h [BLOCK_M, EP * RX] in dt, ext [BLOCK_M, RX], mix [BLOCK_M, EP]): ext is zd [BLOCK_M, RX] with
    a 1 at the bias slot R; h[m, e * RX + j] = mix[b(m), e] * ext[m, j] (module docstring), and at slot
    R + 1 what rounding mix to dt dropped (W holds c there too: the bias term keeps mix's precision)."""
    hid = tl.arange(0, RX)
    eidx = tl.arange(0, EP)
    ext = tl.where(hid[None, :] < R, zd, 0.0) + (hid == R).to(tl.float32)[None, :]
    w = tl.load(MIX + sample[:, None] * E + eidx[None, :], mask=rmask[:, None] & (eidx < E)[None, :], other=0.0)
    w_lo = w - w.to(dt).to(tl.float32)
    h = tl.where((hid == R + 1)[None, None, :], w_lo[:, :, None], w[:, :, None] * ext[:, None, :])
    return tl.reshape(h, (BLOCK_M, EP * RX)).to(dt), ext, w


@triton.jit
def _mma_fwd_kernel(
    X, stride_x, A, AB, WP, MIX, SEED, Y, Z,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RX: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SPLIT_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    dt = X.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    hid = tl.arange(0, RX)
    hmask = hid < R
    offs = tl.arange(0, BLOCK_D)
    x_rows = X + rows64[:, None] * stride_x
    y_rows = Y + rows64[:, None] * D

    # z = x A^T + a
    z = tl.zeros([BLOCK_M, RX], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        at = tl.load(A + hid[None, :] * D + cols[:, None], mask=hmask[None, :] & cmask[:, None], other=0.0)
        z = tl.dot(x, at.to(dt), z, input_precision=PRECISION)
    z += tl.load(AB + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + rows64[:, None] * R + hid[None, :], z, mask=rmask[:, None] & hmask[None, :])
    if HAS_DROPOUT:
        z = tl.where(_keep_mask(SEED, rows, hid, R, p_drop), z * keep_scale, 0.0)
    h, _ext, _w = _mixed_rows(z, MIX, rows // S, rmask, R, E, EP, RX, BLOCK_M, dt)

    # y = x + s * h W; the tile of x was just read: mostly an L2 hit
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        acc = tl.dot(h, _w_tile(WP, 0, cols, cmask, D, EP * RX), input_precision=PRECISION)
        if SPLIT_W:  # fp32 weights, 16-bit activations: add the part of W the cast dropped
            acc = tl.dot(h, _w_tile(WP, 1, cols, cmask, D, EP * RX), acc, input_precision=PRECISION)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        tl.store(y_rows + cols[None, :], round_to(x.to(tl.float32) + scale * acc, dt, SOFT_RNE), mask=mask)


@triton.jit
def _mma_bwd_rows_kernel(
    DY, stride_dy, Z, WP, MIX, SEED, DZ, DMIX,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RX: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SPLIT_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per row: T = dy W^T over all columns (one product per chunk), then d z = dropout'(s * sum_e
    mix_e T_e) (before dropout: d of z = x A^T + a) and d mix_e = s * sum_j ext_j T_e,j."""
    dt = DY.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    hid = tl.arange(0, RX)
    hmask = hid < R
    eidx = tl.arange(0, EP)
    offs = tl.arange(0, BLOCK_D)

    t = tl.zeros([BLOCK_M, EP * RX], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        t = tl.dot(dy, tl.trans(_w_tile(WP, 0, cols, cmask, D, EP * RX)), t, input_precision=PRECISION)
        if SPLIT_W:  # fp32 weights, 16-bit activations: add the part of W the cast dropped
            t = tl.dot(dy, tl.trans(_w_tile(WP, 1, cols, cmask, D, EP * RX)), t, input_precision=PRECISION)

    # read after the loop: live across it, these would cost registers (occupancy)
    zmask = rmask[:, None] & hmask[None, :]
    zd = tl.load(Z + rows64[:, None] * R + hid[None, :], mask=zmask, other=0.0)
    if HAS_DROPOUT:
        keep = _keep_mask(SEED, rows, hid, R, p_drop)
        zd = tl.where(keep, zd * keep_scale, 0.0)
    _h, ext, mix = _mixed_rows(zd, MIX, rows // S, rmask, R, E, EP, RX, BLOCK_M, dt)
    t3 = tl.reshape(t, (BLOCK_M, EP, RX))
    dz = tl.sum(mix[:, :, None] * t3, axis=1) * scale  # [BLOCK_M, RX]
    if HAS_DROPOUT:
        dz = tl.where(keep, dz * keep_scale, 0.0)
    dmix = tl.sum(t3 * ext[:, None, :], axis=2) * scale  # [BLOCK_M, EP]
    tl.store(DZ + rows64[:, None] * R + hid[None, :], dz, mask=zmask)
    tl.store(DMIX + rows64[:, None] * E + eidx[None, :], dmix, mask=rmask[:, None] & (eidx < E)[None, :])


@triton.jit
def _mma_bwd_cols_kernel(
    X, stride_x, DY, stride_dy, Z, DZ, A, MIX, SEED, DX, DA_PART, DU_PART, DC_PART,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RX: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    """Program (c, p): column chunk c over row tiles p, p + P, ...: dx = dy + dz A, and partial sums of
    dA = dz^T x and dW = h^T dy (dU in W's hidden slots, dc in its bias slot), kept in registers."""
    dt = X.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    p = tl.program_id(1)
    P = tl.num_programs(1)
    hid = tl.arange(0, RX)
    hmask = hid < R
    a = tl.load(A + hid[:, None] * D + cols[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0).to(dt)
    da = tl.zeros([RX, BLOCK_D], dtype=tl.float32)
    dw = tl.zeros([EP * RX, BLOCK_D], dtype=tl.float32)
    for tile in range(p, tl.cdiv(M, BLOCK_M), P):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        zmask = rmask[:, None] & hmask[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dz = tl.load(DZ + rows64[:, None] * R + hid[None, :], mask=zmask, other=0.0).to(dt)
        if NEED_DX:
            dx = dy.to(tl.float32) + tl.dot(dz, a, input_precision=PRECISION)
            tl.store(DX + rows64[:, None] * D + cols[None, :], round_to(dx, dt, SOFT_RNE), mask=mask)
        if NEED_DW:
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            da = tl.dot(tl.trans(dz), x, da, input_precision=PRECISION)
            zd = tl.load(Z + rows64[:, None] * R + hid[None, :], mask=zmask, other=0.0)
            if HAS_DROPOUT:
                zd = tl.where(_keep_mask(SEED, rows, hid, R, p_drop), zd * keep_scale, 0.0)
            h, _ext, _w = _mixed_rows(zd, MIX, rows // S, rmask, R, E, EP, RX, BLOCK_M, dt)
            dw = tl.dot(tl.trans(h), dy, dw, input_precision=PRECISION)
    if NEED_DW:
        p64 = p.to(tl.int64)
        tl.store(DA_PART + p64 * R * D + hid[:, None] * D + cols[None, :], da, mask=hmask[:, None] & cmask[None, :])
        # dW's hidden slots -> dU[e, d, jl] (j in column d's group), its bias slot -> dc[e, d]
        k = tl.arange(0, EP * RX)
        e = k // RX
        j = k % RX
        g = cols // DG
        jl = j[:, None] - (g * RG)[None, :]
        live = (e < E)[:, None] & cmask[None, :]
        umask = live & (j < R)[:, None] & (jl >= 0) & (jl < RG)
        du_offs = p64 * E * D * RG + e[:, None] * (D * RG) + cols[None, :] * RG + jl
        tl.store(DU_PART + du_offs, dw * scale, mask=umask)
        # dc: the bias slot plus the router-weight remainder's slot
        eidx = tl.arange(0, EP)
        dc = tl.sum(tl.reshape(tl.where(((j == R) | (j == R + 1))[:, None], dw, 0.0), (EP, RX, BLOCK_D)), axis=1)
        tl.store(DC_PART + p64 * E * D + eidx[:, None] * D + cols[None, :], dc * scale,
                 mask=(eidx < E)[:, None] & cmask[None, :])


@triton.jit
def _keep_mask_kernel(SEED, OUT, M, p_drop, R: tl.constexpr, RP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The dropout keep mask the adapter kernels use, written out (for tests and inspection)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hid = tl.arange(0, RP)
    keep = _keep_mask(SEED, rows, hid, R, p_drop)
    mask = (rows < M)[:, None] & (hid < R)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * R + hid[None, :], keep.to(tl.int8), mask=mask)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------


@on_tensor_device
def keep_mask(seed: torch.Tensor, M: int, R: int, p_drop: float) -> torch.Tensor:
    """Boolean [M, R]: which hidden activations the adapter kernels keep for ``seed``."""
    out = torch.empty((M, R), dtype=torch.int8, device=seed.device)
    if M:
        _keep_mask_kernel[(cdiv(M, 64),)](seed, out, M, float(p_drop), R=R, RP=hidden_pad(R), BLOCK_M=64,
                                            **COMPILE_OPTIONS)
    return out.bool()


def _dims(x2: torch.Tensor, down_w: torch.Tensor, up_w: torch.Tensor, groups: int):
    M, D = x2.shape
    R = down_w.shape[0]
    E = up_w.shape[0]
    return M, D, R, E, R // groups, D // groups


def _split_weights(x2, up_w, up_b) -> bool:
    """Whether the up-projection's products take two passes (x-dtype part and remainder) to keep fp32
    weights' precision with 16-bit activations."""
    return x2.dtype != torch.float32 and torch.float32 in (up_w.dtype, up_b.dtype)


class PackedW(NamedTuple):
    """The up-projection and biases packed for the kernels (:func:`_pack_w_kernel`)."""

    wp: torch.Tensor  # [planes * EP * RX, D] in x's dtype
    EP: int  # experts, padded to a power of two
    RX: int  # slots per expert (:func:`slots`)
    split: bool  # a second plane holds the remainder of fp32 weights

    @property
    def EK(self) -> int:
        return self.EP * self.RX

    def planes(self, planes: int | None = None) -> int:
        """W-sized tiles per pipeline stage: ``planes``, by default this packing's."""
        return (2 if self.split else 1) if planes is None else planes

    def launch(self, x2: torch.Tensor, kernel: str, planes: int | None = None) -> AdapterLaunch:
        """``kernel``'s tile shape, fitted to shared memory with ``planes`` W-sized tiles per stage
        (:meth:`planes`)."""
        return fit(launch_config(x2.dtype, kernel), self.EK, self.planes(planes), x2.element_size(), kernel)


def _unpacked(x2, up_w, up_b, groups) -> PackedW:
    """The packing's layout, before anything is packed (wp None)."""
    E, D, RG = up_w.shape
    return PackedW(None, next_pow2(E), slots(RG * groups), _split_weights(x2, up_w, up_b))


def _check_fits(x2, up_w, up_b, groups, kernels) -> None:
    """A ValueError before anything runs where a kernel's tiles do not fit shared memory even at
    :func:`fit`'s narrowest (Triton would refuse the launch as out of resources)."""
    pw = _unpacked(x2, up_w, up_b, groups)
    for kernel, planes in kernels:
        cfg = pw.launch(x2, kernel, planes)
        need = smem_bytes(cfg, pw.EK, pw.planes(planes), x2.element_size())
        if need > SMEM_BUDGET:
            E, R = up_w.shape[0], up_w.shape[2] * groups
            raise ValueError(
                f"mma_adapter: {E} experts of hidden width {R} are too wide for the Triton kernels, which keep "
                f"every expert's up-projection tile in shared memory ({pw.EP} x {pw.RX} padded slots): "
                f"{need} bytes at the narrowest tile, above their {SMEM_BUDGET}-byte budget. Use fewer experts "
                f"or a narrower hidden width (LaVIN's adapters: hidden 8, 2 experts), or MMFAST_BACKEND=reference")


def pack_w(x2, up_w, up_b, groups) -> PackedW:
    E, D, RG = up_w.shape
    R = RG * groups
    pw = _unpacked(x2, up_w, up_b, groups)
    wp = torch.empty(((2 if pw.split else 1) * pw.EK, D), dtype=x2.dtype, device=x2.device)
    block_d = 64 if pw.EK <= 64 else 16
    _pack_w_kernel[(cdiv(D, block_d),)](
        up_w, up_b, wp, D, D // groups, R=R, RG=RG, E=E, EP=pw.EP, RX=pw.RX, SPLIT_W=pw.split, BLOCK_D=block_d,
        num_warps=4, **COMPILE_OPTIONS)
    return pw._replace(wp=wp)


@on_tensor_device
def adapter_fwd(x2, S, down_w, down_b, up_w, up_b, mix, scale, groups, p_drop, seed):
    """Forward over rows x2 [M, D] (unit column stride), M = B * S. Returns (y [M, D], z [M, R] fp32)."""
    M, D, R, E, RG, DG = _dims(x2, down_w, up_w, groups)
    y = torch.empty((M, D), dtype=x2.dtype, device=x2.device)
    z = torch.empty((M, R), dtype=torch.float32, device=x2.device)
    if M == 0:
        return y, z
    _check_fits(x2, up_w, up_b, groups, [("fwd", None)])
    down_w, down_b, up_w, up_b = (t.contiguous() for t in (down_w, down_b, up_w, up_b))  # read densely
    pw = pack_w(x2, up_w, up_b, groups)
    cfg = pw.launch(x2, "fwd")
    _mma_fwd_kernel[(cdiv(M, cfg.block_m),)](
        x2, x2.stride(0), down_w, down_b, pw.wp, mix, seed, y, z,
        M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
        R=R, RX=pw.RX, RG=RG, E=E, EP=pw.EP, HAS_DROPOUT=p_drop > 0,
        SPLIT_W=pw.split, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        PRECISION=_dot_precision(x2.dtype), SOFT_RNE=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **COMPILE_OPTIONS,
    )
    return y, z


@on_tensor_device
def adapter_bwd(dy2, x2, z, S, down_w, up_w, up_b, mix, scale, groups, p_drop, seed, need_dx, need_dw, need_dmix):
    """Backward of :func:`adapter_fwd`. Returns (dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix), None where
    not requested. d_mix is per sample [B, E] (fp32)."""
    M, D, R, E, RG, DG = _dims(x2, down_w, up_w, groups)
    dev = x2.device
    B = mix.shape[0]
    dx = torch.empty((M, D), dtype=x2.dtype, device=dev) if need_dx else None
    grads = [None] * 4
    dmix = None
    if M == 0:
        if need_dw:
            grads = [torch.zeros_like(t) for t in (down_w, down_w[:, 0], up_w, up_b)]
        return dx, *grads, (torch.zeros_like(mix) if need_dmix else None)

    _check_fits(x2, up_w, up_b, groups, [("rows", None)] + ([("cols", 1)] if need_dx or need_dw else []))
    z, down_w, up_w, up_b = (t.contiguous() for t in (z, down_w, up_w, up_b))  # read densely
    pw = pack_w(x2, up_w, up_b, groups)
    common = dict(R=R, RX=pw.RX, RG=RG, E=E, EP=pw.EP, HAS_DROPOUT=p_drop > 0, PRECISION=_dot_precision(x2.dtype),
                  **COMPILE_OPTIONS)
    dz = torch.empty((M, R), dtype=torch.float32, device=dev)
    dmix_rows = torch.empty((M, E), dtype=torch.float32, device=dev)
    cfg = pw.launch(x2, "rows")
    _mma_bwd_rows_kernel[(cdiv(M, cfg.block_m),)](
        dy2, dy2.stride(0), z, pw.wp, mix, seed, dz, dmix_rows,
        M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
        SPLIT_W=pw.split, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    if need_dmix:
        dmix = dmix_rows.view(B, S, E).sum(1)

    if need_dx or need_dw:
        cfg = pw.launch(x2, "cols", planes=1)  # reads no W; h^T [EK, block_m] goes through shared memory
        chunks = cdiv(D, cfg.block_d)
        tiles = cdiv(M, cfg.block_m)
        P = max(1, min(tiles, (cfg.programs_per_sm * sm_count(dev)) // chunks or 1))
        parts = [torch.empty((P, n), dtype=torch.float32, device=dev) for n in (R * D, E * D * RG, E * D)] \
            if need_dw else [None, None, None]
        _mma_bwd_cols_kernel[(chunks, P)](
            x2, x2.stride(0), dy2, dy2.stride(0), z, dz, down_w, mix, seed, dx, *parts,
            M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
            NEED_DX=need_dx, NEED_DW=need_dw, SOFT_RNE=interpreting(), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )
        if need_dw:
            targets = (torch.empty_like(down_w), torch.empty_like(up_w), torch.empty_like(up_b))
            for part, out in zip(parts, targets):
                sum_partials(part, out.view(-1))
            grads = [targets[0], dz.sum(0), targets[1], targets[2]]  # d down_b: fp32, cast by the caller
    return dx, *grads, dmix
