"""The NAS driver: samplers, the bilevel search loop, derive/extract, checkpoints, CLI.

- :mod:`.samplers`: one file per sampler, found by a registry: DARTS (softmax),
  sparsemax, DrNAS (Dirichlet), GDAS (hard Gumbel-softmax, straight-through, linear
  temperature annealing), SPOS (uniform one-hot), SNAS (soft Gumbel-softmax).
- :mod:`.config`: :class:`SearchConfig` and :func:`build_config` (defaults -> space
  defaults -> flags).
- :mod:`.loop`: :class:`Search` (first-order bilevel loop, second-order unrolled DARTS
  option, DDP); :mod:`.report`: selection, evaluation, :func:`train_from_scratch`,
  arch.json; :mod:`.runlog`: run files; :mod:`.rundir`: the lock on a run's folder.
- :mod:`.engine`: the old module, re-exporting these names.
- :mod:`.evolution`: random search and evolution over a trained supernet (SPOS stage 2).
- :mod:`.checkpoint`: atomic checkpoints loaded with ``weights_only=True``.
- :mod:`.cli`: ``tangle-search`` / ``python -m tangle_kernels.search``.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .common import derive_seed, detach_arch
from .config import SearchConfig, SearchError, build_config
from .loop import Search, SearchDiverged, run_search
from .report import train_from_scratch
from .unrolled import unrolled_arch_grad
from .evolution import evolution, random_search
from .samplers import (
    SAMPLERS,
    DartsSampler,
    DrNASSampler,
    GDASSampler,
    Sampler,
    SNASSampler,
    SparsemaxSampler,
    SPOSSampler,
    decision_report,
    format_decision,
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
    "SNASSampler",
    "SPOSSampler",
    "Sampler",
    "Search",
    "SearchConfig",
    "SearchError",
    "SearchDiverged",
    "build_config",
    "decision_report",
    "format_decision",
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
