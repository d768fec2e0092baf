"""The held-out protocol's corpora: which texts search quality is measured on, and which
of them no default may be chosen on.

Every corpus is about 32 KB of English (the size on which the main command's defaults
failed, issue 28). Besides the embedded Sonnets they are disjoint pieces of different
plays of Tiny Shakespeare, named here by the file, a character offset, a length and the
piece's sha256: the text is never copied into the repository. :func:`materialize`
cuts a piece into a cache folder outside it (``$TANGLE_CORPUS_CACHE``, default
``~/.cache/tangle_kernels/corpora``) and refuses a source whose piece has another hash.

The split was fixed before any of these corpora was searched, by alternating the plays
in file order (Coriolanus and Romeo for tuning, Richard III, The Winter's Tale and The
Taming of the Shrew held out); the Sonnets are a tuning corpus because the first
defaults were chosen on them. Measure for Measure and The Tempest are spare held-out
pieces. Choose every default and every method on ``split == "tuning"`` only, and
report the held-out ones as they come.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from .bench import ROOT

__all__ = ["Corpus", "CORPORA", "by_split", "get", "materialize", "shared_data_dir"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    split: str  # "tuning" or "held-out"
    source: str  # "embedded" (the package's sonnets.txt) or a file of the shared data
    offset: int = 0  # characters
    length: int = 0  # characters; 0 = the whole source
    sha256: str = ""  # of the piece's UTF-8 bytes
    about: str = ""

    @property
    def ident(self) -> str:
        """What the benchmark's cache key says of the data."""
        if self.source == "embedded":
            return "embedded:sonnets.txt"
        return f"{self.source}@{self.offset}+{self.length}:{self.sha256[:16]}"


_TS = "tinyshakespeare.txt"
CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("sonnets", "tuning", "embedded", about="Shakespeare's Sonnets (embedded, 31,947 chars)"),
    Corpus("coriolanus", "tuning", _TS, 0, 32355,
           "df9852ed84b6f058310155c5b09f3f1572edf24cc812766127f0e1b569e89423",
           "Coriolanus, Act I"),
    Corpus("romeo", "tuning", _TS, 460075, 32019,
           "a872588a817377ef10b3f6b992a807fb488b3d0de0ec169f725b3c63eb4cc40c",
           "Romeo and Juliet"),
    Corpus("richard3", "held-out", _TS, 160038, 32028,
           "98ee21aece3f497b5c9e46ce8842eb7e36bf93ea1031fe4c10a95da09d231130",
           "Richard III"),
    Corpus("winterstale", "held-out", _TS, 722028, 32249,
           "4383438488691048867251532171463d6c983efc6a9008d9526693233dee6f42",
           "The Winter's Tale"),
    Corpus("shrew", "held-out", _TS, 1010320, 32052,
           "08b9e722c37cca912ec7a81e436e9c28383000a6bd9b3225623af6e371e5a585",
           "The Taming of the Shrew"),
    Corpus("measure", "held-out", _TS, 860410, 32076,
           "5299d144e67ec1f47fdbfb29caea97edd1697d9aaf24c23c7fd731a003b1616e",
           "Measure for Measure (spare)"),
    Corpus("tempest", "held-out", _TS, 1082192, 32031,
           "b51df3cd8020a8aa3d1f704ed41aff7c18dc6bded884f143246ea6a0fef443d8",
           "The Tempest (spare)"),
)}

#: the corpora the benchmark runs by default (the spares on request)
DEFAULT = ("sonnets", "coriolanus", "romeo", "richard3", "winterstale", "shrew")


def get(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise SystemExit(f"--corpus {name!r}: one of {', '.join(CORPORA)}") from None


def by_split(split: str, names=DEFAULT) -> list[str]:
    return [n for n in names if CORPORA[n].split == split]


def shared_data_dir() -> str:
    """``$TANGLE_SHARED_DATA``, else ``../shared/data`` next to the checkout."""
    env = os.environ.get("TANGLE_SHARED_DATA")
    if env:
        return env
    return os.path.join(os.path.dirname(ROOT), "shared", "data")


def _cache_dir() -> str:
    return os.environ.get("TANGLE_CORPUS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tangle_kernels", "corpora")


def materialize(c: Corpus) -> str | None:
    """The path of the corpus's text (None = the embedded default), cut from its source
    into the cache on first use; the piece's sha256 is checked every time."""
    if c.source == "embedded":
        return None
    path = os.path.join(_cache_dir(), f"{c.name}-{c.sha256[:12]}.txt")
    if not os.path.exists(path):
        src = os.path.join(shared_data_dir(), c.source)
        if not os.path.exists(src):
            raise SystemExit(f"corpus {c.name}: its source {src} is not there (set "
                             f"TANGLE_SHARED_DATA to the folder that holds {c.source})")
        with open(src, encoding="utf-8") as f:
            text = f.read()
        piece = text[c.offset:c.offset + c.length]
        got = hashlib.sha256(piece.encode("utf-8")).hexdigest()
        if got != c.sha256:
            raise SystemExit(f"corpus {c.name}: {src}[{c.offset}:{c.offset + c.length}] has "
                             f"sha256 {got[:16]}..., the protocol names {c.sha256[:16]}...: "
                             "another version of the file")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(piece)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != c.sha256:
        raise SystemExit(f"corpus {c.name}: cached {path} has another sha256; delete it")
    return path
