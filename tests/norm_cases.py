"""Builds a norm test case and checks mmfast against the float64 reference (see ``accuracy.py``).

For each case three computations run on the same inputs:

* ``ours``: ``mmfast.rms_norm`` / ``mmfast.layer_norm`` (the backend the environment selects), or
  another computation of the same outputs and gradients (``check_case``'s ``run``);
* ``lowp``: PyTorch's own implementation in the same low precision: HF ``LlamaRMSNorm`` math
  (== ``rms_norm_reference``, checked bitwise in test_norm.py) and native ``F.layer_norm``, with the
  residual added in x's dtype first;
* ``ref``: the reference in float64.

The loss seen by backward is ``sum(y * gy) + sum(residual_out * gh)`` with random gy, gh.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import mmfast
from accuracy import assert_accurate

EPS = {"rms": 1e-6, "ln": 1e-5}
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-fp32w": (torch.bfloat16, torch.float32),
}


@dataclasses.dataclass
class Case:
    kind: str  # "rms" | "ln"
    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    gy: torch.Tensor
    gh: torch.Tensor | None

    @property
    def eps(self) -> float:
        return EPS[self.kind]

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.weight, self.bias, self.residual) if t is not None and t.requires_grad]


def make_case(kind, lead, N, dtypes="bf16", residual=False, weight=True, bias=True, device="cpu",
              x_layout=None, grad_weight=True) -> Case:
    """Random inputs; ``x_layout(t)`` may return a non-contiguous tensor with t's values."""
    x_dtype, w_dtype = DTYPES[dtypes] if isinstance(dtypes, str) else dtypes
    shape = (*lead, N)

    def act(offset=0.0):
        t = (torch.randn(shape, device=device) * 1.5 + offset).to(x_dtype)
        return x_layout(t) if x_layout is not None else t

    x = act(0.5 if kind == "ln" else 0.0).requires_grad_()
    w = b = None
    if weight:
        w = (1 + 0.1 * torch.randn(N, device=device)).to(w_dtype).requires_grad_(grad_weight)
    if bias and kind == "ln":
        b = (0.1 * torch.randn(N, device=device)).to(w_dtype).requires_grad_(grad_weight)
    r = act().requires_grad_() if residual else None
    gy = act()
    gh = act() if residual else None
    return Case(kind, x, w, b, r, gy, gh)


def _detached(case: Case, dtype=None) -> Case:
    def cv(t):
        if t is None:
            return None
        return (t.detach().to(dtype) if dtype is not None else t.detach()).requires_grad_(t.requires_grad)

    return dataclasses.replace(case, x=cv(case.x), weight=cv(case.weight), bias=cv(case.bias), residual=cv(case.residual))


def run_ours(case: Case):
    c = _detached(case)
    if c.kind == "rms":
        out = mmfast.rms_norm(c.x, c.weight, c.eps, residual=c.residual)
    else:
        out = mmfast.layer_norm(c.x, c.weight, c.bias, c.eps, residual=c.residual)
    y, h = out if c.residual is not None else (out, None)
    return y, h, _grads(c, y, h)


def run_lowp(case: Case):
    c = _detached(case)
    h = c.x + c.residual if c.residual is not None else None
    inp = h if h is not None else c.x
    if c.kind == "rms":
        y = mmfast.rms_norm_reference(inp, c.weight, c.eps)
    else:
        w, b = c.weight, c.bias
        if any(t is not None and t.dtype != inp.dtype for t in (w, b)):
            # low-precision x with fp32 weights: torch's CUDA layer_norm rejects mixed dtypes, and
            # autocast (and the CPU kernel) computes it as fp32 LayerNorm of the upcast input
            inp = inp.float()
        y = F.layer_norm(inp, (inp.shape[-1],), w, b, c.eps).to(c.x.dtype)
    return y, h, _grads(c, y, h)


def run_ref(case: Case):
    c = _detached(case, torch.float64)
    x = c.x
    if c.residual is not None:
        # The contract: residual_out = x + residual in x's dtype, and y = norm(residual_out). The reference
        # takes that one rounding (its value; the gradient passes through as through the sum) and computes
        # the rest in float64. Without it the reference normalised the unrounded sum, and the rounding of
        # residual_out, which every implementation shares, dominated both errors: their comparison was
        # then a draw between two kinds of rounding noise (a fused dweight that is the more accurate one
        # failed 1 x PyTorch's error on some seeds).
        rounded = (case.x.detach() + case.residual.detach()).double()
        x = c.x + (rounded - (c.x + c.residual)).detach()
    if c.kind == "rms":
        out = mmfast.rms_norm_reference(x, c.weight, c.eps, residual=c.residual)
    else:
        out = mmfast.layer_norm_reference(x, c.weight, c.bias, c.eps, residual=c.residual)
    y, h = out if c.residual is not None else (out, None)
    return y, h, _grads(c, y, h, torch.float64)


def _grads(c: Case, y, h, dtype=None):
    leaves = c.leaves()
    if not leaves:
        return []
    outs, gos = [y], [c.gy.to(dtype) if dtype else c.gy]
    if h is not None:
        outs.append(h)
        gos.append(c.gh.to(dtype) if dtype else c.gh)
    return list(torch.autograd.grad(outs, leaves, gos, allow_unused=True))


def _stats64(case: Case, h64):
    x = h64 if h64 is not None else case.x.detach().double()
    xc = x if case.kind == "rms" else x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + case.eps)
    return xc * rstd, rstd


def check_case(case: Case, seed: int, run=None) -> None:
    """Run the three computations and apply the accuracy rule to every output and gradient.

    ``run(case) -> (y, residual_out, grads)`` is the computation under test (default ``run_ours``); grads
    are those of ``case.leaves()``, in that order."""
    gy_before = case.gy.clone()
    y, h, grads = (run or run_ours)(case)
    assert torch.equal(case.gy, gy_before), "backward wrote into dy"
    y_lp, h_lp, grads_lp = run_lowp(case)
    y_ref, h_ref, grads_ref = run_ref(case)
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    assert_accurate("y", y, y_lp, y_ref, y_ref.abs().max().item() if y_ref.numel() else 0.0, seed)
    if h is not None:
        assert h.dtype == case.x.dtype
        assert_accurate("residual_out", h, h_lp, h_ref, h_ref.abs().max().item() if h_ref.numel() else 0.0, seed)

    N = case.x.shape[-1]
    xhat, rstd = _stats64(case, h_ref.detach() if h_ref is not None else None)
    gy = case.gy.double()
    w = case.weight.detach().double() if case.weight is not None else torch.ones(N, dtype=torch.float64, device=gy.device)
    rows = lambda t: t.reshape(-1, N)  # noqa: E731
    empty = gy.numel() == 0
    dx_scale = 0.0 if empty else (rstd.max() * (gy * w).abs().max()).item()
    if case.gh is not None and not empty:
        dx_scale += case.gh.double().abs().max().item()
    scales = {
        "x": dx_scale,
        "residual": dx_scale,
        "weight": 0.0 if empty else rows((gy * xhat).abs()).sum(0).max().item(),
        "bias": 0.0 if empty else rows(gy.abs()).sum(0).max().item(),
    }
    names = [n for n in ("x", "weight", "bias", "residual") if getattr(case, n) is not None and getattr(case, n).requires_grad]
    for name, g, g_lp, g_ref in zip(names, grads, grads_lp, grads_ref):
        assert g is not None, f"d{name} missing"
        param = getattr(case, name)
        assert g.dtype == param.dtype, f"d{name} dtype {g.dtype} != {param.dtype}"
        reduced_rows = gy.numel() // N if name in ("weight", "bias") else 1
        assert_accurate(f"d{name}", g, g_lp, g_ref, scales[name], seed, terms=reduced_rows)


def special_geometry(N: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(vectors per thread, threads per block, rows per block) of the CUDA C++ kernels at a special width:
    the geometry of csrc/norm_common.cuh (spec_items, spec_tpr, block_threads, rows_per_block)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    units = N // vec
    items = 5 if units % 5 == 0 else (3 if units % 3 == 0 else 4)
    tpr = units // items
    return items, max(tpr, 128), max(128 // tpr, 1)


def staged_fits(N: int, dtype: torch.dtype, stages: int, bufs: int, smem_optin: int) -> bool:
    """Whether the staged backward's shared memory (stages x bufs x items x threads x 16 bytes, plus 1 KiB
    for the reduction) fits a device that lets a block opt into ``smem_optin`` bytes."""
    items, threads, _ = special_geometry(N, dtype)
    return stages * bufs * items * threads * 16 + 1024 <= smem_optin


def staged_rows(N: int, dtype: torch.dtype, sms: int) -> int:
    """Rows for which every block of a persistent grid on ``sms`` SMs (4 blocks each) walks at least six row
    groups, more than the deepest stage count, so the ring of stages wraps; the last group part-filled
    where a block holds several rows."""
    return 6 * sms * 4 * special_geometry(N, dtype)[2] + 5
