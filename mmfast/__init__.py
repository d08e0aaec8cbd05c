"""mmfast: fused GPU kernels for parameter-efficient finetuning of multimodal LLMs."""

__version__ = "0.1.0"

from .api import patch, unpatch
from .nn.adapter import MMAdapter
from .ops.adapter import mma_adapter
from .ops.backend import backends_used, use_backend
from .ops.loss import linear_cross_entropy
from .ops.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from .ops.quick_gelu import quick_gelu
from .ops.swiglu import swiglu
from .patching import PatchReport, disabled
from .tuning import load_trainable, save_trainable
from .tuning.mma import MMAOptions

__all__ = [
    "__version__",
    "MMAOptions",
    "MMAdapter",
    "PatchReport",
    "SaveTrainable",
    "disabled",
    "load_trainable",
    "patch",
    "save_trainable",
    "unpatch",
    "backends_used",
    "use_backend",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "mma_adapter",
    "quick_gelu",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
]


def __getattr__(name: str):
    if name == "SaveTrainable":  # (imports transformers' Trainer callbacks: only when asked for)
        from .tuning.callbacks import SaveTrainable

        return SaveTrainable
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
