"""Compatibility module: the search engine's public names, from where they live now.

- :mod:`.config`: :class:`SearchConfig`, :class:`SearchError`, :func:`build_config`;
- :mod:`.loop`: :class:`Search` (setup, step, loop), :func:`run_search`;
- :mod:`.report`: :func:`train_from_scratch` and the end of a run;
- :mod:`.common`, :mod:`.unrolled`, :mod:`.runlog`: the shared pieces.

New code imports from those modules or from :mod:`tangle_kernels.search`.
"""

from __future__ import annotations

from .common import (
    compile_line as _compile_line,
    cosine_lr,
    derive_seed,
    detach_arch,
    eval_batches as _eval_batches,
    eval_model as _eval_model,
    generator as _generator,
    make_w_optimizer as _make_w_optimizer,
    precision_context,
)
from .config import PRECISIONS, SearchConfig, SearchError, build_config
from .loop import CHECKPOINT_FORMAT, Search, SearchDiverged, run_search
from .report import train_from_scratch
from .runlog import jsonable as _jsonable, write_json as _write_json
from .unrolled import unrolled_arch_grad

__all__ = [
    "SearchConfig",
    "SearchError",
    "SearchDiverged",
    "Search",
    "run_search",
    "build_config",
    "derive_seed",
    "detach_arch",
    "unrolled_arch_grad",
    "train_from_scratch",
    "CHECKPOINT_FORMAT",
    "PRECISIONS",
    "cosine_lr",
    "precision_context",
]

# the old private helpers some callers used
_PRIVATE = (_compile_line, _eval_batches, _eval_model, _generator, _make_w_optimizer, _jsonable,
            _write_json)
