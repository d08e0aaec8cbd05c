"""``MMAdapter``: the Mixture-of-Modality adapter with its router, as an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.adapter import mma_adapter, mma_adapter_lavin_style
from .disable import is_disabled

IMPLS = ("fused", "eager")


class InitWhenMaterialized:
    """Mixin for the modules mmfast makes: ``to_empty`` (the only way off the meta device: ``to`` raises there)
    leaves a module's parameters whatever the memory held. One made on the meta device (a model built there,
    then patched), which no base checkpoint loads, takes its own init there instead (``_init_own``: its own
    parameters; its children do the same), as when made on a device: an MMA adapter starts as the identity.
    Per module, so that a materialisation module by module (FSDP1's ``to_empty(recurse=False)``) gets it too."""

    def _init_own(self) -> None:
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        was_meta = any(p.is_meta for p in self.parameters(recurse=False))
        out = super()._apply(fn, recurse)
        if was_meta and not any(p.is_meta for p in self.parameters(recurse=False)):
            self._init_own()
        return out


class _XavierLinear(InitWhenMaterialized, nn.Linear):
    """A Linear with LaVIN's init: xavier-uniform weight, zero bias (the adapter's ``down``, the visual neck's
    layers). Its own ``reset_parameters``: a flow that re-initialises every module after ``to_empty``
    (``modules()`` order: the adapter before its children) gives it this init, not ``nn.Linear``'s."""

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _Router(InitWhenMaterialized, nn.Linear):
    """The adapter's router: ``nn.Linear`` with its init."""


def unloaded_mma(what: str, device: torch.device) -> RuntimeError:
    """The error for MMA weights left on the meta device under an input on ``device``."""
    return RuntimeError(
        f"{what} hold no values, on the meta device (the input is on {device}): the model was patched with "
        "tuning='mma' on the meta device and its weights loaded since (load_state_dict(..., assign=True)) "
        "without MMA's modules, which a checkpoint of the base model does not hold. Patch after loading the "
        "weights; for trained adapters, mmfast.load_trainable(model, file) after model.to_empty(...) and the load")


class MMAdapter(InitWhenMaterialized, nn.Module):
    """``y = x + scale * sum_e softmax(router(route) / temperature)_e * up_e(dropout(down(x)))``.

    Parameters: ``down`` (``nn.Linear(dim, hidden_dim)``), ``up_weight`` ``[experts, dim, hidden_dim //
    groups]`` (grouped: output channels of group g read hidden channels of group g), ``up_bias``
    ``[experts, dim]``, ``router`` (``nn.Linear(dim, experts)``). ``down`` starts xavier-uniform with a
    zero bias, the up-projections at zero (a new adapter is exactly the identity), the router with
    ``nn.Linear``'s default init.

    ``forward(x [B, S, dim], route [B, dim])``: ``route`` is what each sample's router reads (its
    modality token's state). Dropout applies to the hidden activations in training mode only.

    ``impl``: ``"fused"`` (the Triton op, default) or ``"eager"`` (a LaVIN-style PyTorch composition in
    x's dtype, one expert at a time; for comparisons). Inside ``mmfast.disabled()`` the adapter runs the
    eager composition whatever ``impl`` says, as patched modules run their original forwards there.
    """

    def __init__(self, dim: int, hidden_dim: int = 8, groups: int = 2, experts: int = 2, scale: float = 1.0,
                 temperature: float = 10.0, dropout: float = 0.1, *, device=None, dtype=None):
        super().__init__()
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim), ("groups", groups), ("experts", experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MMAdapter: {name} must be a positive int, got {v!r}")
        if hidden_dim % groups or dim % groups:
            raise ValueError(f"MMAdapter: groups={groups} must divide hidden_dim={hidden_dim} and dim={dim}")
        if not 0 <= dropout < 1:
            raise ValueError(f"MMAdapter: dropout must be in [0, 1), got {dropout}")
        if not temperature > 0:
            raise ValueError(f"MMAdapter: temperature must be > 0, got {temperature}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.groups, self.experts = dim, hidden_dim, groups, experts
        self.scale, self.temperature, self.dropout = float(scale), float(temperature), float(dropout)
        self.down = _XavierLinear(dim, hidden_dim, **factory)
        self.up_weight = nn.Parameter(torch.empty(experts, dim, hidden_dim // groups, **factory))
        self.up_bias = nn.Parameter(torch.empty(experts, dim, **factory))
        self.router = _Router(dim, experts, **factory)
        self.impl = "fused"
        if not self.up_weight.is_meta:  # (down and the router initialised themselves: drawn once)
            nn.init.zeros_(self.up_weight)
            nn.init.zeros_(self.up_bias)

    def reset_parameters(self) -> None:
        if self.down.weight.is_meta:
            return
        self.down.reset_parameters()
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)
        self.router.reset_parameters()  # (after to_empty it held whatever the memory did)

    def _init_own(self) -> None:
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)

    def mix(self, route: Tensor) -> Tensor:
        """Router weights per sample, ``[B, experts]``, in the router's dtype."""
        logits = self.router(route.to(self.router.weight.dtype))
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: Tensor, route: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MMAdapter: x must be [batch, seq, {self.dim}], got {getattr(x, 'shape', type(x))}")
        if not isinstance(route, Tensor) or route.shape != (x.shape[0], self.dim):
            raise ValueError(f"MMAdapter: route must be [{x.shape[0]}, {self.dim}] (one per sample), "
                             f"got {getattr(route, 'shape', type(route))}")
        if self.impl not in IMPLS:
            raise ValueError(f"MMAdapter: impl must be one of {IMPLS}, got {self.impl!r}")
        # an Accelerate offload hook on ``down`` (``cpu_offload``, a ``device_map`` with "cpu" or "disk"
        # entries) keeps its weights on the meta device between its own calls; they are read here without
        # calling it, so its hook loads them around the adapter's call
        hook = getattr(self.down, "_hf_hook", None) if self.down.weight.is_meta else None
        if hook is None:
            if self.down.weight.is_meta and not x.is_meta:
                raise unloaded_mma("MMAdapter: its weights", x.device)
            return self._forward(x, route)
        hook.pre_forward(self.down)
        try:
            return self._forward(x, route)
        finally:
            hook.post_forward(self.down, None)

    def _forward(self, x: Tensor, route: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.impl == "eager" or is_disabled():
            keep = None
            if p > 0:
                keep = (torch.rand(*x.shape[:-1], self.hidden_dim, device=x.device) >= p).to(x.dtype) / (1 - p)
            return mma_adapter_lavin_style(x, self.down.weight, self.down.bias, self.up_weight, self.up_bias,
                                           self.mix(route), self.scale, self.groups, keep)
        if x.dtype == torch.float64:
            raise TypeError("MMAdapter: the fused kernel takes float32, float16 or bfloat16, got float64; "
                            "impl='eager' or `with mmfast.disabled():` runs it in float64")
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
        return mma_adapter(x, self.down.weight, self.down.bias, self.up_weight, self.up_bias, self.mix(route),
                           self.scale, self.groups, p, seed)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, groups={self.groups}, experts={self.experts}, "
                f"scale={self.scale}, temperature={self.temperature}, dropout={self.dropout}")
