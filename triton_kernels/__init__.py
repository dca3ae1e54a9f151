"""Triton kernels for the fused ops, installed as ``lightnet_ops.triton_kernels``."""
