"""Search quality: does a sampler find a good architecture, and how good?

The entry point of ``benchmarks/quality`` (what it measures: its ``__init__``)::

    python benchmarks/search_quality.py                                  # embedded corpus
    python benchmarks/search_quality.py --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.quality import (  # noqa: E402
    ALL_METHODS,
    README_END,
    README_START,
    SAMPLER_RUNS,
    build_parser,
    main,
    percentile,
    random_search_from_reference,
)

__all__ = ["ALL_METHODS", "README_END", "README_START", "SAMPLER_RUNS", "build_parser", "main",
           "percentile", "random_search_from_reference"]

if __name__ == "__main__":
    sys.exit(main())
