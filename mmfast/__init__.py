"""mmfast: fused GPU kernels for parameter-efficient finetuning of multimodal LLMs."""

__version__ = "0.1.0"

from .ops.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

__all__ = [
    "__version__",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
]
