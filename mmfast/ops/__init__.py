"""``torch.library`` custom ops (namespace ``mmfast``) with fake impls and autograd, the backend
choice, and the pure-PyTorch reference each op is defined by."""

from .norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]
