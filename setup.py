"""Setuptools shim.

A plain ``pip install .`` is pure Python: the Triton kernels compile at first use. The optional CUDA
C++ extension (``csrc/``) is built on first use as well; nothing here requires nvcc.
"""

from setuptools import setup

setup()
