"""The accuracy rule every kernel test applies.

The fused result is compared with a float64 reference computed from the same inputs. Its largest
absolute error must be at most twice the error PyTorch's own low-precision implementation makes on
the same inputs, plus a small absolute term: one unit of the result dtype's precision at the
quantity's natural scale (``scale``, e.g. max|y| for an output, sum over rows of |dy * xhat| for a
weight gradient, the sum of the magnitudes of the terms it subtracts for an input gradient). NaN or inf never passes.

For a sum over ``terms`` rows (the weight and bias gradients) the absolute term is the error bound of a
pairwise (tree) summation, the order PyTorch's own reductions use: ceil(log2(terms)) units at that
scale. PyTorch's realised error on one draw can be far below that bound by luck of the order (seen:
0.2 units on 10 rows), and twice a lucky error is not a bound on any other correct order.
"""

from __future__ import annotations

import math

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_accurate(name: str, ours: torch.Tensor, lowp: torch.Tensor, ref: torch.Tensor, scale: float, seed: int,
                    terms: int = 1):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (seed {seed})"
    err = max_err(ours, ref)
    err_lowp = max_err(lowp, ref)
    atol = torch.finfo(ours.dtype).eps * scale * max(1, math.ceil(math.log2(max(terms, 1))))
    bound = 2 * err_lowp + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} > 2 x PyTorch's {err_lowp:.3e} + {atol:.3e} "
        f"(dtype {ours.dtype}, scale {scale:.3e}, {terms} terms, seed {seed})"
    )
