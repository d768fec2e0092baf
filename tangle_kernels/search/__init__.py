"""The NAS driver: samplers, the bilevel search loop, derive/extract, checkpoints, CLI.

- :mod:`.samplers`: DARTS (softmax), sparsemax, DrNAS (Dirichlet), GDAS (hard
  Gumbel-softmax, straight-through, linear temperature annealing), SPOS (uniform one-hot).
- :mod:`.engine`: :class:`SearchConfig`, :class:`Search` (first-order bilevel loop,
  second-order unrolled DARTS option, DDP), :func:`train_from_scratch`.
- :mod:`.evolution`: random search and evolution over a trained supernet (SPOS stage 2).
- :mod:`.checkpoint`: atomic checkpoints loaded with ``weights_only=True``.
- :mod:`.cli`: ``tangle-search`` / ``python -m tangle_kernels.search``.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .engine import (
    Search,
    SearchConfig,
    SearchError,
    derive_seed,
    detach_arch,
    run_search,
    train_from_scratch,
    unrolled_arch_grad,
)
from .evolution import evolution, random_search
from .samplers import (
    SAMPLERS,
    DartsSampler,
    DrNASSampler,
    GDASSampler,
    Sampler,
    SparsemaxSampler,
    SPOSSampler,
    linear_tau,
    make_sampler,
    sparsemax,
)

__all__ = [
    "SAMPLERS",
    "CheckpointError",
    "DartsSampler",
    "DrNASSampler",
    "GDASSampler",
    "SPOSSampler",
    "Sampler",
    "Search",
    "SearchConfig",
    "SearchError",
    "SparsemaxSampler",
    "derive_seed",
    "detach_arch",
    "evolution",
    "linear_tau",
    "load_checkpoint",
    "make_sampler",
    "random_search",
    "run_search",
    "save_checkpoint",
    "sparsemax",
    "train_from_scratch",
    "unrolled_arch_grad",
]
