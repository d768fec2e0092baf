"""A run owns its output folder: one lock per folder, no silent reuse.

:class:`RunDir` takes an exclusive, non-blocking lock (``flock`` on
``OUT/.tangle-search.lock``, released when the run ends or its process dies, so a
killed run never leaves a stale lock) and refuses, with one line:

- a second run while another holds the folder;
- a new run where a finished or interrupted one lives (``checkpoint.pt``,
  ``arch.json`` or a non-empty ``metrics.jsonl``), unless it resumes (``--resume``) or
  is told to start over (``--overwrite``).
"""

from __future__ import annotations

import os

from .config import SearchError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: an O_EXCL marker instead
    fcntl = None

__all__ = ["RunDir", "RUN_FILES", "LOCK_NAME"]

LOCK_NAME = ".tangle-search.lock"
#: the files whose presence means a run lives in the folder
RUN_FILES = ("checkpoint.pt", "arch.json", "metrics.jsonl")


def holds_run(out: str) -> list[str]:
    """The run files in ``out`` (an empty metrics.jsonl does not count)."""
    found = []
    for name in RUN_FILES:
        p = os.path.join(out, name)
        if os.path.isfile(p) and (name != "metrics.jsonl" or os.path.getsize(p) > 0):
            found.append(name)
    return found


class RunDir:
    """The lock of one run on ``out`` (see the module docstring)."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self, *, resume: bool, overwrite: bool) -> None:
        os.makedirs(self.out, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                other = _read(fd)
                os.close(fd)
                raise SearchError(
                    f"--out {self.out}: another search is running there"
                    f"{f' (pid {other})' if other else ''}; wait for it or use another --out"
                ) from None
        else:  # pragma: no cover
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise SearchError(
                    f"--out {self.out}: another search is running there ({self.path} exists; "
                    f"remove it if no search runs)"
                ) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if not resume and not overwrite:
            found = holds_run(self.out)
            if found:
                self.release()
                raise SearchError(
                    f"--out {self.out} holds a run ({', '.join(found)}); continue it with "
                    f"--resume, start over with --overwrite, or use another --out"
                )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the flock

    def __del__(self):  # a Search set up but never run
        try:
            self.release()
        except Exception:
            pass


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 32).decode().strip()
    except OSError:
        return ""
