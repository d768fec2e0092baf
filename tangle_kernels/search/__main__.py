"""``python -m tangle_kernels.search``: the ``tangle-search`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
