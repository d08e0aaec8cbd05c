"""Module-level pieces: the fused forwards bound onto patched norm modules (``norm``) and the
``nn.Module``s that own parameters (the MMA adapter)."""
