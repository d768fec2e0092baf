"""Search quality: does a sampler find a good architecture, and how good?

One command (CPU)::

    python benchmarks/search_quality.py                                  # embedded corpus
    python benchmarks/search_quality.py --data ../shared/data/tinyshakespeare.txt

1. **Reference distribution**: every architecture of the space (a uniform sample of
   ``--reference-sample`` when the space has more than ``--max-reference``) trained from
   scratch with the main command's retrain budget (``retrain_steps`` steps, the space's
   search defaults for batch, lr and schedule, seed ``--reference-seed``, the same
   validation batches for all). Trained in a fixed random order and appended one line
   per architecture to ``reference.jsonl`` in the work folder: an interrupted run keeps
   what it finished, is a uniform sample meanwhile, and resumes where it stopped.
2. **Samplers** (every sampler of the registry; SPOS as spos+evolution and spos+random) at equal
   wall-clock over ``--seeds``: the time budget is the default search (drnas,
   ``steps``) of the same seed; each other sampler gets the number of steps that fits in
   it (its time per step measured on a short probe; SPOS also pays its selection stage
   out of it). Each run: the derived architecture, how decided it was (final
   probabilities, entropy), its supernet validation loss, search time, and its
   from-scratch validation loss = its entry in the reference (trained identically:
   same seed, same steps, same batches), hence its percentile. One line per run in
   ``runs.jsonl`` (resumable).
3. **Random search** at the same wall-clock: architectures drawn uniformly without
   replacement and trained from scratch with the same budget, as many as fit in the
   budget (at least one), the best by validation loss kept. Its trainings are the
   reference's trainings (same seed and batches: the results are identical), so it is
   computed from the reference table and its recorded training times, not re-run.

Outputs: ``--out``/<date>-search-quality[-TAG].json and .md, the alpha trajectories of
one seed per sampler (``<date>-search-quality[-TAG]-alphas.png``), and a README section
between ``<!-- search-quality:start -->`` and ``<!-- search-quality:end -->`` of
``docs/search-quality.md`` (``--readme FILE`` for another file, ``--no-readme`` to skip),
written by ``benchmarks/sections.py``. ``--quick`` (tests/CI): the tiny preset, a few steps.

Percentile: the share of the reference distribution that beats the derived
architecture (strictly lower validation loss): 0% = the best architecture of the
space; "top 25%" means a percentile below 25.

Modules: :mod:`.bench` (the runs), :mod:`.report` (summary, files, section),
:mod:`.cli` (flags, ``main``).
"""

from .bench import (
    ALL_METHODS,
    SAMPLER_RUNS,
    Bench,
    decidedness,
    percentile,
    random_search_from_reference,
)
from .cli import build_parser, main
from .report import README_END, README_START, ordering_verdict, render_md, summarize

__all__ = [
    "ALL_METHODS",
    "SAMPLER_RUNS",
    "README_START",
    "README_END",
    "Bench",
    "build_parser",
    "decidedness",
    "main",
    "ordering_verdict",
    "percentile",
    "random_search_from_reference",
    "render_md",
    "summarize",
]
