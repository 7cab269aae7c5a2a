"""Triton kernels. Imported only by the autograd ops, and only when Triton is installed.

Kernels run on the GPU, or on the CPU under ``TRITON_INTERPRET=1`` (what CI does on small shapes).
"""
