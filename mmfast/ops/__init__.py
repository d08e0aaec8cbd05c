"""``torch.library`` custom ops (namespace ``mmfast``) with fake impls and autograd, the backend
choice, and the pure-PyTorch reference each op is defined by."""

from .loss import linear_cross_entropy, linear_cross_entropy_reference
from .norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

__all__ = ["layer_norm", "layer_norm_reference", "linear_cross_entropy", "linear_cross_entropy_reference",
           "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference"]
