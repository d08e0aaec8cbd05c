"""Triton kernels for the Mixture-of-Modality adapter (METHODS.md, section 2), and their launchers.

For tokens x [M, D] (M = B * S, sample b = row // S), router weights mix [B, E] and:

    z  = x A^T + a                          A [R, D], a [R]                 (fp32, saved for backward)
    zd = dropout(z)                         mask from (seed, row * R + j), regenerated in backward
    y  = x + s * sum_e mix[b, e] * (zd ._G U_e^T + c_e)       U [E, D, R/G], c [E, D]

``._G`` is the grouped up-projection: output channel d (group g = d // (D/G)) reads hidden channels
[g R/G, (g+1) R/G). The experts fold into one up-projection per column chunk: each expert's weights are
loaded "expanded" to all R hidden channels (zero outside the column's group) and mixed by the router
weight of each row.

Products run in x's dtype on the tensor cores (fp32 inputs: exact fp32), with fp32 accumulation;
fp32 weights (master weights) are cast to x's dtype for the products, except in the backward's
dy . U, where U is split into its x-dtype part and the remainder (two products) so that d(z) and
the router-weight gradient keep fp32 weights' precision.

Forward: one kernel; a tile of rows is read twice, chunk by chunk (for z, then for y); the tile is
small enough (BLOCK_M rows) that the second read mostly hits L2. Backward: a row kernel reads dy once for d(zd) and the router-weight
gradient per row; a column kernel reads x and dy once, writes dx and keeps dA, dU, dc partials in
registers for its column chunk over its rows; one fixed-order reduction finishes them (deterministic).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import round_to, sum_partials
from ._device import interpreting, sm_count

# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdapterLaunch:
    block_m: int  # rows per tile (tl.dot needs at least 16)
    block_d: int  # column chunk
    num_warps: int


def launch_config(dtype: torch.dtype) -> AdapterLaunch:
    """Tile shape of all three kernels. Chosen so that none spills registers on sm_90 (see
    ``python -m mmfast.kernels.compile_check``): 16-bit inputs use the tensor cores; fp32 inputs use
    exact fp32 products, which take more registers, so a shorter tile."""
    if dtype == torch.float32:
        return AdapterLaunch(16, 64, 8)
    return AdapterLaunch(32, 64, 8)


def hidden_pad(R: int) -> int:
    """Hidden width padded for tl.dot (at least 16, a power of two)."""
    return max(16, triton.next_power_of_2(R))


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
def _up_expanded(U, e, cols, cmask, hid, hmask, D, DG, RG: tl.constexpr):
    """Expert e's up weights for a column chunk as [RP, BLOCK_D]: (j, d) = U[e, d, j - g(d) * RG] when
    hidden channel j belongs to column d's group g(d) = d // DG, else 0."""
    g = cols // DG
    jl = hid[:, None] - (g * RG)[None, :]
    mask = hmask[:, None] & cmask[None, :] & (jl >= 0) & (jl < RG)
    return tl.load(U + e * D * RG + cols[None, :].to(tl.int64) * RG + jl, mask=mask, other=0.0)


@triton.jit
def _down_chunk(x, A, cols, cmask, hid, hmask, D, dt: tl.constexpr, PRECISION: tl.constexpr):
    """x [BLOCK_M, BLOCK_D] times the matching columns of A, transposed: [BLOCK_M, RP]."""
    at = tl.load(A + hid[None, :] * D + cols[:, None], mask=hmask[None, :] & cmask[:, None], other=0.0)
    return tl.dot(x, at.to(dt), input_precision=PRECISION)


@triton.jit
def _up_chunk(x, zc, U, C, MIX, sample, rmask, cols, cmask, hid, hmask, D, DG, scale,
              RG: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              dt: tl.constexpr, PRECISION: tl.constexpr):
    """y for a column chunk: x + s * sum_e mix_e * (zd ._G U_e^T + c_e), fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for e in tl.static_range(E):
        ue = _up_expanded(U, e, cols, cmask, hid, hmask, D, DG, RG)
        ce = tl.load(C + e * D + cols, mask=cmask, other=0.0).to(tl.float32)
        we = tl.load(MIX + sample * E + e, mask=rmask, other=0.0)
        acc += we[:, None] * (tl.dot(zc, ue.to(dt), input_precision=PRECISION) + ce[None, :])
    return x.to(tl.float32) + scale * acc


@triton.jit
def _mma_fwd_kernel(
    X, stride_x, A, AB, U, C, MIX, SEED, Y, Z,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RP: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    dt = X.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    sample = rows // S
    hid = tl.arange(0, RP)
    hmask = hid < R
    offs = tl.arange(0, BLOCK_D)
    x_rows = X + rows64[:, None] * stride_x
    y_rows = Y + rows64[:, None] * D

    # z = x A^T + a
    z = tl.zeros([BLOCK_M, RP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        z += _down_chunk(x, A, cols, cmask, hid, hmask, D, dt, PRECISION)
    z += tl.load(AB + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + rows64[:, None] * R + hid[None, :], z, mask=rmask[:, None] & hmask[None, :])
    if HAS_DROPOUT:
        z = tl.where(_keep_mask(SEED, rows, hid, R, p_drop), z * keep_scale, 0.0)
    zc = z.to(dt)

    # y = x + s * sum_e mix_e * (zd ._G U_e^T + c_e); the tile of x was just read: mostly an L2 hit
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        y = _up_chunk(x, zc, U, C, MIX, sample, rmask, cols, cmask, hid, hmask, D, DG, scale,
                      RG, E, BLOCK_M, BLOCK_D, dt, PRECISION)
        tl.store(y_rows + cols[None, :], round_to(y, dt, SOFT_RNE), mask=mask)


@triton.jit
def _mma_bwd_rows_kernel(
    DY, stride_dy, Z, U, C, MIX, SEED, DZ, DMIX,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RP: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SPLIT_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per row: dz = dropout'(s * sum_e mix_e * dy ._G U_e) (before dropout: d of z = x A^T + a), and
    dmix_e = s * sum_d dy_d * (zd ._G U_e^T + c_e)_d."""
    dt = DY.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    sample = rows // S
    hid = tl.arange(0, RP)
    hmask = hid < R
    eidx = tl.arange(0, EP)
    offs = tl.arange(0, BLOCK_D)
    zmask = rmask[:, None] & hmask[None, :]
    zd = tl.load(Z + rows64[:, None] * R + hid[None, :], mask=zmask, other=0.0)
    if HAS_DROPOUT:
        keep = _keep_mask(SEED, rows, hid, R, p_drop)
        zd = tl.where(keep, zd * keep_scale, 0.0)

    dzd = tl.zeros([BLOCK_M, RP], dtype=tl.float32)
    dmix = tl.zeros([BLOCK_M, EP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cmask = cols < D
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        for e in tl.static_range(E):
            ue = _up_expanded(U, e, cols, cmask, hid, hmask, D, DG, RG)
            hi = ue.to(dt)
            te = tl.dot(dy, tl.trans(hi), input_precision=PRECISION)  # [BLOCK_M, RP]
            if SPLIT_W:  # fp32 weights, 16-bit activations: add the part of U the cast dropped
                lo = (ue.to(tl.float32) - hi.to(tl.float32)).to(dt)
                te += tl.dot(dy, tl.trans(lo), input_precision=PRECISION)
            we = tl.load(MIX + sample * E + e, mask=rmask, other=0.0)
            dzd += we[:, None] * te
            ce = tl.load(C + e * D + cols, mask=cmask, other=0.0).to(tl.float32)
            part = tl.sum(zd * te, axis=1) + tl.sum(dy.to(tl.float32) * ce[None, :], axis=1)
            dmix = tl.where(eidx[None, :] == e, dmix + part[:, None], dmix)
    dz = dzd * scale
    if HAS_DROPOUT:
        dz = tl.where(keep, dz * keep_scale, 0.0)
    tl.store(DZ + rows64[:, None] * R + hid[None, :], dz, mask=zmask)
    tl.store(DMIX + rows64[:, None] * E + eidx[None, :], dmix * scale, mask=rmask[:, None] & (eidx < E)[None, :])


@triton.jit
def _mma_bwd_cols_kernel(
    X, stride_x, DY, stride_dy, Z, DZ, A, MIX, SEED, DX, DA_PART, DU_PART, DC_PART,
    M, S, D, DG, scale, p_drop, keep_scale,
    R: tl.constexpr, RP: tl.constexpr, RG: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SOFT_RNE: tl.constexpr,
):
    """Program (c, p): column chunk c over row tiles p, p + P, ...: dx = dy + dz A, and partial sums of
    dA = dz^T x, dU_e = s (mix_e zd)^T dy (grouped), dc_e = s sum mix_e dy, kept in registers."""
    dt = X.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    p = tl.program_id(1)
    P = tl.num_programs(1)
    hid = tl.arange(0, RP)
    hmask = hid < R
    eidx = tl.arange(0, EP)
    a = tl.load(A + hid[:, None] * D + cols[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0).to(dt)
    da = tl.zeros([RP, BLOCK_D], dtype=tl.float32)
    du = tl.zeros([EP, RP, BLOCK_D], dtype=tl.float32)
    dc = tl.zeros([EP, BLOCK_D], dtype=tl.float32)
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
            da += tl.dot(tl.trans(dz), x, input_precision=PRECISION)
            zd = tl.load(Z + rows64[:, None] * R + hid[None, :], mask=zmask, other=0.0)
            if HAS_DROPOUT:
                zd = tl.where(_keep_mask(SEED, rows, hid, R, p_drop), zd * keep_scale, 0.0)
            sample = rows // S
            for e in tl.static_range(E):
                we = tl.load(MIX + sample * E + e, mask=rmask, other=0.0)
                t = tl.dot(tl.trans((zd * we[:, None]).to(dt)), dy, input_precision=PRECISION)  # [RP, BLOCK_D]
                du = tl.where(eidx[:, None, None] == e, du + t[None, :, :], du)
                dc = tl.where(eidx[:, None] == e, dc + tl.sum(we[:, None] * dy.to(tl.float32), axis=0)[None, :], dc)
    if NEED_DW:
        p64 = p.to(tl.int64)
        tl.store(DA_PART + p64 * R * D + hid[:, None] * D + cols[None, :], da, mask=hmask[:, None] & cmask[None, :])
        # dU[e, d, jl] from the expanded [RP, BLOCK_D] block: keep j in column d's group
        g = cols // DG
        jl = hid[:, None] - (g * RG)[None, :]
        umask = hmask[:, None] & cmask[None, :] & (jl >= 0) & (jl < RG)
        du_offs = p64 * E * D * RG + eidx[:, None, None] * D * RG + cols[None, None, :] * RG + jl[None, :, :]
        tl.store(DU_PART + du_offs, du * scale, mask=(eidx < E)[:, None, None] & umask[None, :, :])
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


def keep_mask(seed: torch.Tensor, M: int, R: int, p_drop: float) -> torch.Tensor:
    """Boolean [M, R]: which hidden activations the adapter kernels keep for ``seed``."""
    out = torch.empty((M, R), dtype=torch.int8, device=seed.device)
    if M:
        _keep_mask_kernel[(triton.cdiv(M, 64),)](seed, out, M, float(p_drop), R=R, RP=hidden_pad(R), BLOCK_M=64)
    return out.bool()


def _dims(x2: torch.Tensor, down_w: torch.Tensor, up_w: torch.Tensor, groups: int):
    M, D = x2.shape
    R = down_w.shape[0]
    E = up_w.shape[0]
    return M, D, R, E, R // groups, D // groups


def adapter_fwd(x2, S, down_w, down_b, up_w, up_b, mix, scale, groups, p_drop, seed):
    """Forward over rows x2 [M, D] (unit column stride), M = B * S. Returns (y [M, D], z [M, R] fp32)."""
    M, D, R, E, RG, DG = _dims(x2, down_w, up_w, groups)
    y = torch.empty((M, D), dtype=x2.dtype, device=x2.device)
    z = torch.empty((M, R), dtype=torch.float32, device=x2.device)
    if M == 0:
        return y, z
    cfg = launch_config(x2.dtype)
    _mma_fwd_kernel[(triton.cdiv(M, cfg.block_m),)](
        x2, x2.stride(0), down_w, down_b, up_w, up_b, mix, seed, y, z,
        M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
        R=R, RP=hidden_pad(R), RG=RG, E=E, HAS_DROPOUT=p_drop > 0,
        BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, PRECISION=_dot_precision(x2.dtype), SOFT_RNE=interpreting(),
        num_warps=cfg.num_warps,
    )
    return y, z


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

    cfg = launch_config(x2.dtype)
    common = dict(R=R, RP=hidden_pad(R), RG=RG, E=E, EP=triton.next_power_of_2(E), HAS_DROPOUT=p_drop > 0,
                  PRECISION=_dot_precision(x2.dtype), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
                  num_warps=cfg.num_warps)
    dz = torch.empty((M, R), dtype=torch.float32, device=dev)
    dmix_rows = torch.empty((M, E), dtype=torch.float32, device=dev)
    _mma_bwd_rows_kernel[(triton.cdiv(M, cfg.block_m),)](
        dy2, dy2.stride(0), z, up_w, up_b, mix, seed, dz, dmix_rows,
        M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
        SPLIT_W=up_w.dtype == torch.float32 and x2.dtype != torch.float32, **common,
    )
    if need_dmix:
        dmix = dmix_rows.view(B, S, E).sum(1)

    if need_dx or need_dw:
        chunks = triton.cdiv(D, cfg.block_d)
        tiles = triton.cdiv(M, cfg.block_m)
        P = max(1, min(tiles, (4 * sm_count(dev)) // chunks or 1))
        parts = [torch.empty((P, n), dtype=torch.float32, device=dev) for n in (R * D, E * D * RG, E * D)] \
            if need_dw else [None, None, None]
        _mma_bwd_cols_kernel[(chunks, P)](
            x2, x2.stride(0), dy2, dy2.stride(0), z, dz, down_w, mix, seed, dx, *parts,
            M, S, D, DG, float(scale), float(p_drop), 1.0 / (1.0 - p_drop),
            NEED_DX=need_dx, NEED_DW=need_dw, SOFT_RNE=interpreting(), **common,
        )
        if need_dw:
            targets = (torch.empty_like(down_w), torch.empty_like(up_w), torch.empty_like(up_b))
            for part, out in zip(parts, targets):
                sum_partials(part, out.view(-1))
            grads = [targets[0], dz.sum(0).to(down_w.dtype), targets[1], targets[2]]
    return dx, *grads, dmix
