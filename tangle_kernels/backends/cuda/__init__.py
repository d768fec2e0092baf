"""CUDA kernels (csrc/cuda/) through ``tangle_kernels._C``, launched on PyTorch's current
stream: one wrapper per op."""
