"""The one writer of generated Markdown sections, shared by every generator
(``benchmarks/run.py``, ``benchmarks/search_quality``, ``benchmarks/step_ab.py``).

A generated section lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
in a Markdown file. :func:`write_section` replaces what is between the markers and
keeps everything else; a file without the markers gets them appended under
``heading`` (a file that does not exist is created). The write goes through a temp
file unique to this process, then ``os.replace``, so an interrupted or concurrent
writer never leaves a half-written file. :func:`git_commit` names the commit a record
was made on.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    if not name or any(c in name for c in "<> \n") or "--" in name or name.startswith("-"):
        raise ValueError(f"section name {name!r}: one word without '<', '>', '--' or spaces")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str, *, heading: str | None = None) -> str:
    """``text`` with the section ``name`` replaced by ``body``. Without the markers:
    appended under ``## heading`` when ``heading`` is given, else a ValueError."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        return text[: i + len(start)] + "\n" + body.strip() + "\n" + text[j:]
    if i >= 0 or j >= 0:
        raise ValueError(f"the markers {start} ... {end} are out of order or one is missing")
    if heading is None:
        raise ValueError(f"the markers {start} ... {end} are missing")
    sep = "\n\n" if text.strip() else ""
    return text.rstrip("\n") + f"{sep}## {heading}\n\n{start}\n{body.strip()}\n{end}\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file unique to this writer in the same
    folder (the library's :func:`tangle_kernels.search.runlog.atomic_write`)."""
    from tangle_kernels.search.runlog import atomic_write

    atomic_write(path, lambda f: f.write(text))


def write_section(path: str | os.PathLike, name: str, body: str, *,
                  heading: str | None = None) -> None:
    """Replace (or append) the section ``name`` of the Markdown file ``path``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text_atomic(path, replace_section(text, name, body, heading=heading))


def git_commit(root: str | os.PathLike | None = None) -> str:
    """The short hash of HEAD of the repository at ``root`` (this one by default), or
    ``unknown`` outside a git checkout."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"
