"""Data sources for the search driver: a character-level text corpus and synthetic data.

The default corpus, ``sonnets.txt`` next to this file, ships with the package so the
README's main command runs on a fresh machine with no download: 51 of Shakespeare's
Sonnets (1-35 and 16 well-known later ones; the 1609 quarto text, public domain,
modernised spelling), about 32 KB. ``--data path/to/text`` takes any text file instead
(``../shared/data/tinyshakespeare.txt`` in tests and benchmarks).
"""

from __future__ import annotations

import os
import warnings
from importlib import resources

import torch

__all__ = [
    "DataError",
    "DataWarning",
    "looks_binary",
    "CharCorpus",
    "MarkovText",
    "default_corpus_text",
    "DEFAULT_CORPUS_NAME",
    "read_text_file",
]

DEFAULT_CORPUS_NAME = "sonnets.txt"
DEFAULT_CORPUS_DESCRIPTION = (
    "51 of Shakespeare's Sonnets (1-35 and 16 later ones; 1609 quarto, public domain), ~32 KB"
)


class DataError(ValueError):
    """A data source that cannot be used (missing, empty, too short); the CLI prints the
    message and exits non-zero."""


class DataWarning(UserWarning):
    """Data that can be used but is probably not what was meant (a binary file as text);
    the CLI prints it as one ``warning:`` line."""


#: bytes of a text file: printable ASCII, whitespace, and everything >= 0x80 (UTF-8, Latin-1)
_TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t\n\r\f\b\x1b" + bytes(range(0x80, 0x100))


def looks_binary(raw: bytes, sample: int = 1 << 16) -> bool:
    """Whether ``raw`` looks like a binary file: a NUL byte, or more than 10% control
    bytes, in its first ``sample`` bytes."""
    head = raw[:sample]
    if not head:
        return False
    if b"\x00" in head:
        return True
    control = len(head.translate(None, _TEXT_BYTES))
    return control > 0.1 * len(head)


def default_corpus_text() -> str:
    """The embedded default corpus (see module docstring)."""
    return resources.files(__package__).joinpath(DEFAULT_CORPUS_NAME).read_text(encoding="utf-8")


def read_text_file(path: str | os.PathLike) -> str:
    """Read a text file as UTF-8 (Latin-1 when it is not valid UTF-8: every byte maps to a
    character, so any file reads). Raises :class:`DataError` for a missing, unreadable or
    empty file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"data path is a directory, expected a text file: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise DataError(f"data file is empty: {path}")
    if looks_binary(raw):
        warnings.warn(
            f"{path} does not look like a text file (NUL or control bytes); it is read as "
            f"characters all the same",
            DataWarning,
            stacklevel=2,
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class CharCorpus:
    """A character-level corpus split into a train and a validation part.

    ``vocab`` is the sorted set of characters; ``data`` the int64 token ids of the whole
    text. The first ``train_fraction`` of the text is the train split, the rest the
    validation split (the architecture split of the bilevel search, and the split the
    derived architecture is scored on).
    """

    def __init__(self, text: str, *, name: str = "text", train_fraction: float = 0.9):
        if not text or not text.strip():
            raise DataError(f"{name}: the text is empty")
        if not 0.0 < train_fraction < 1.0:
            raise DataError(f"train_fraction={train_fraction} must be in (0, 1)")
        self.name = name
        self.vocab: list[str] = sorted(set(text))
        if len(self.vocab) < 2:
            raise DataError(
                f"{name}: the text has a single distinct character ({self.vocab[0]!r}); a "
                f"language model needs at least 2 to have anything to predict"
            )
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.int64)
        n = int(len(self.data) * train_fraction)
        self.splits = {"train": self.data[:n], "val": self.data[n:]}

    @classmethod
    def from_source(cls, source: str | None, **kw) -> CharCorpus:
        """``None`` or ``"default"``: the embedded corpus; otherwise a text file path."""
        if source in (None, "", "default"):
            return cls(default_corpus_text(), name=f"embedded:{DEFAULT_CORPUS_NAME}", **kw)
        return cls(read_text_file(source), name=os.fspath(source), **kw)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def check_block_size(self, block_size: int) -> None:
        for split, d in self.splits.items():
            if len(d) < block_size + 2:
                raise DataError(
                    f"{self.name}: the {split} split has {len(d)} characters, fewer than "
                    f"block_size + 2 = {block_size + 2}; use a longer text or a smaller block_size"
                )

    def batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``[B, T]`` and next-character targets."""
        d = self.splits[split]
        ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=generator)
        offs = torch.arange(block_size)
        x = d[ix[:, None] + offs]
        y = d[ix[:, None] + offs + 1]
        return x.to(device), y.to(device)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s if c in self.stoi], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


class MarkovText(CharCorpus):
    """Synthetic token stream for ``--data synthetic``: a random sparse first-order Markov
    chain over ``vocab_size`` symbols (each symbol has ``fanout`` likely successors), so a
    language model can learn it and its loss falls well below ``log(vocab_size)``."""

    def __init__(
        self,
        vocab_size: int = 32,
        length: int = 40_000,
        *,
        fanout: int = 3,
        seed: int = 1234,
        train_fraction: float = 0.9,
    ):
        if not 2 <= vocab_size <= 94:
            raise DataError(f"vocab_size={vocab_size} must be in [2, 94]")
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab_size, vocab_size), -4.0)
        for s in range(vocab_size):
            nxt = torch.randperm(vocab_size, generator=g)[:fanout]
            logits[s, nxt] = torch.randn(fanout, generator=g) + 2.0
        probs = torch.softmax(logits, dim=1)
        seq = torch.empty(length, dtype=torch.int64)
        cur = 0
        u = torch.multinomial(probs, length, replacement=True, generator=g)  # [V, length]
        for i in range(length):
            cur = int(u[cur, i])
            seq[i] = cur
        self.name = f"synthetic(markov, vocab={vocab_size})"
        self.vocab = [chr(0x21 + i) for i in range(vocab_size)]
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        self.data = seq
        n = int(length * train_fraction)
        self.splits = {"train": seq[:n], "val": seq[n:]}
