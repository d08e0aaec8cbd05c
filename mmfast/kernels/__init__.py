"""Triton kernels and their host launchers. Importing this package does not import Triton; the
kernel modules (``mmfast.kernels.norm``, ...) do."""
