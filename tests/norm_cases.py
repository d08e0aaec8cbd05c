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
            w, b = (None if t is None else t.float() for t in (w, b))  # one fp32, one bf16: both fp32
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


def _natural_scales(case: Case, h64) -> dict[str, float]:
    """The scale of one unit of rounding error of each result (accuracy.py): the magnitudes of the terms its
    computation adds or subtracts, not the result's own, which is smaller wherever they cancel.

    * ``xhat = (x - mean) * rstd`` (mean = 0 for RMSNorm): |x| + |mean| at rstd, ``mag`` below. A LayerNorm row
      whose mean is large against its spread cancels here, and the rounding of the mean alone (in any fp32
      computation) is then many units of |y|: seen, seed 111 of an N = 3 fp32 row (mean 1.62, spread 0.26),
      1.4 units of max|y|, where PyTorch's error on that draw happened to be 0.3 unit.
    * ``y = w * xhat + b``: |w| * mag + |b|.
    * ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = w * dy`` (RMSNorm: no mean(g)), plus
      the residual branch's gradient: the terms' largest magnitudes, xhat's at mag, at the largest rstd. Where they cancel (N = 1, where
      xhat = +-1 - eps/2x^2, or one element dominating its row) the last term counts as much as the first:
      seen, seed 1942805502, RMSNorm N = 1 fp32, an error of 1.2 units of the first term's scale alone, where
      PyTorch's error was 0.1 unit.
    * ``dweight = sum over rows of dy * xhat``: |dy| * mag summed (the row count enters as ``terms``);
      ``dbias``: |dy| summed.
    """
    if case.gy.numel() == 0:
        return dict.fromkeys(("y", "x", "residual", "weight", "bias"), 0.0)
    N = case.x.shape[-1]
    x = h64 if h64 is not None else case.x.detach().double()
    mean = x.mean(-1, keepdim=True) if case.kind == "ln" else torch.zeros_like(x[..., :1])
    xc = x - mean
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + case.eps)
    xhat, mag = xc * rstd, (x.abs() + mean.abs()) * rstd
    gy = case.gy.double()
    w = case.weight.detach().double() if case.weight is not None else torch.ones(N, dtype=torch.float64, device=gy.device)
    b = case.bias.detach().double().abs().max().item() if case.bias is not None else 0.0
    g = gy * w
    terms = g.abs().max() + ((g * xhat).mean(-1, keepdim=True).abs() * mag).max()
    if case.kind == "ln":
        terms = terms + g.mean(-1).abs().max()
    dx = (rstd.max() * terms).item() + (case.gh.double().abs().max().item() if case.gh is not None else 0.0)
    rows = lambda t: t.reshape(-1, N)  # noqa: E731
    return {
        "y": (w.abs() * mag).max().item() + b,
        "x": dx,
        "residual": dx,
        "weight": rows(gy.abs() * mag).sum(0).max().item(),
        "bias": rows(gy.abs()).sum(0).max().item(),
    }


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
    scales = _natural_scales(case, h_ref.detach() if h_ref is not None else None)
    assert_accurate("y", y, y_lp, y_ref, scales["y"], seed)
    if h is not None:
        assert h.dtype == case.x.dtype
        assert_accurate("residual_out", h, h_lp, h_ref, h_ref.abs().max().item() if h_ref.numel() else 0.0, seed)

    N = case.x.shape[-1]
    reduced_rows = case.gy.numel() // N
    names = [n for n in ("x", "weight", "bias", "residual") if getattr(case, n) is not None and getattr(case, n).requires_grad]
    for name, g, g_lp, g_ref in zip(names, grads, grads_lp, grads_ref):
        assert g is not None, f"d{name} missing"
        param = getattr(case, name)
        assert g.dtype == param.dtype, f"d{name} dtype {g.dtype} != {param.dtype}"
        assert_accurate(f"d{name}", g, g_lp, g_ref, scales[name], seed,
                        terms=reduced_rows if name in ("weight", "bias") else 1)


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
