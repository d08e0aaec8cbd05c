"""Instance-level patching of HuggingFace models' norm modules (table in ``table.py``), MLP gates
(``mlp.py``) and LM-head loss (``loss.py``)."""

from .core import PatchReport, disabled, is_disabled, is_patched, patch_norms, unpatch_norms

__all__ = ["PatchReport", "disabled", "is_disabled", "is_patched", "patch_norms", "unpatch_norms"]
