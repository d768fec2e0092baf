"""C++/OpenMP kernels (csrc/cpu/) through ``tangle_kernels._C``: one wrapper per op.

The extension takes raw pointers and sizes; each wrapper guarantees contiguity, dtype
and device and passes the arguments by name (csrc/bindings.cpp re-checks them).
"""

# The flat names of the former single-file backend (``backends/cpu.py``), kept for
# callers that patch or import them; the ops call the wrappers through these names, so
# a patched name is the one that runs.
from .attention import backward as attention_backward  # noqa: E402,F401
from .attention import dropout_keep  # noqa: E402,F401
from .attention import forward as attention_forward  # noqa: E402,F401
from .attention import why_unavailable as attention_unavailable  # noqa: E402,F401
from .head_partition import head_gather, head_gather_multi, head_scatter, head_scatter_multi  # noqa: E402,F401
