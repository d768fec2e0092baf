"""The ``torch`` backend: vectorised PyTorch kernels, any device (named ``pytorch`` so
that no submodule of ``tangle_kernels.backends`` shadows the ``torch`` package)."""
