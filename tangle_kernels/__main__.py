"""``python -m tangle_kernels info``: print what this installation can run."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("info",):
        print("usage: python -m tangle_kernels info", file=sys.stderr)
        return 2
    import tangle_kernels

    d = tangle_kernels.info()
    backends = d.pop("backends")
    for k, v in d.items():
        print(f"{k:22s} {v}")
    for dev, table in backends.items():
        print(f"backends on {dev}:")
        for name, why in table.items():
            print(f"  {name:10s} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
