"""Shared helpers of the tangle-search CLI tests (tests/search/test_search_cli.py,
test_robustness.py, test_budget.py)."""

from __future__ import annotations

from tangle_kernels.search.cli import main


def run_cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``tangle-search argv``."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, part):
    """Exit 2 and exactly one ``tangle-search: error: ...`` line containing ``part``."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("tangle-search: error: ") and part in lines[0], lines[0]
    assert "Traceback" not in err
