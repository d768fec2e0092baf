"""The declarative search-space API used by the search driver.

A search space says four things, and nothing about optimisers or loops:

1. **choices**: ``name -> list of values`` (e.g. ``{"embed": [64, 96, 128],
   "heads": [2, 4], "mlp_ratio": [2, 3, 4], "layers": [2, 3, 4]}``), plus
   **hparams**: fixed, typed settings (``block_size``...). Both have class-level
   defaults, optional named **presets**, and user overrides (``--choice``, ``--hp``);
   :meth:`SearchSpace.check` rejects values the space cannot take, with one clear
   message (:class:`SpaceError`).
2. **data**: :meth:`SearchSpace.make_data` turns the ``--data`` argument (a path,
   ``"synthetic"``, or ``None`` for the space's default source) into a
   :class:`DataSource` with ``train`` and ``val`` splits.
3. **model**: :meth:`SearchSpace.build_supernet` builds the weight-entangled supernet
   from ``tangle_kernels.nn`` modules only; its ``forward`` takes the inputs of a batch
   and reads the architecture set with ``tangle_kernels.nn.set_arch``.
   :meth:`SearchSpace.loss` is the training loss of a batch, :meth:`SearchSpace.evaluate`
   the validation metrics.
4. **derive/extract**: a *selection* (``name -> value``, one value per choice) picks a
   sub-network; :meth:`SearchSpace.extract` returns it as a plain ``nn.Module`` with
   the supernet's (inherited) weights, :meth:`SearchSpace.build_plain` a freshly
   initialised one for training from scratch, :meth:`SearchSpace.param_count` its size.

The driver (``tangle_kernels.search``) calls :meth:`SearchSpace.loss` with either the
supernet itself or its ``DistributedDataParallel`` wrapper (under torchrun): ``loss`` must
reach the model only through ``model(inputs)``. It sets the architecture with
``set_arch`` before each call (a soft arch, a ``HardArch``, or ``None``: max size).
Class attribute ``search_defaults`` gives the driver's training defaults for the space
(``batch_size``, ``lr``, ``w_optimizer``, ``arch_lr``, ``steps``...; any
``SearchConfig`` field), used where the user gives no flag. A space with a tabular
benchmark implements :meth:`SearchSpace.query_benchmark` (``--benchmark FILE``).

**Per-layer choices.** A space may name ``layer_choices`` (e.g. ``heads`` and
``mlp_ratio`` of a transformer) and its ``depth_choice`` (``layers``). With the hparam
``per_layer=true`` each such choice ``n`` becomes one choice per layer, ``n_0 ..
n_{L-1}`` (``L`` = the largest depth), every one starting from ``n``'s values: the
samplers then keep one architecture vector per layer (the paper's ``[max_layers, K]``
architecture tensors) and a derived architecture has one value per layer. ``--choice
n=...`` sets the values of every layer, ``--choice n_3=...`` those of layer 3 only.
With ``per_layer=false`` the layers share one choice ``n``. A layer beyond the chosen
depth does not run; its choice is kept in the selection (and ignored by the model).

To add a space: subclass :class:`SearchSpace`, set ``name``, ``description``,
``default_choices``, ``default_hparams`` (and ``presets``), implement ``make_data``,
``build_supernet`` and ``loss`` (and ``check`` for semantic constraints), then
``register_space(MySpace)`` in ``tangle_kernels/spaces/__init__.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

__all__ = [
    "SpaceError",
    "DataSource",
    "SearchSpace",
    "parse_value",
    "parse_assignment",
]


class SpaceError(ValueError):
    """A space configuration that cannot be built (unknown space or choice, a value the
    space cannot take); the CLI prints the message and exits non-zero."""


class DataSource(Protocol):
    """What the driver needs from a data source. ``batch`` returns ``(inputs, targets)``
    on ``device``, drawing randomness only from ``generator`` (the driver passes a CPU
    ``torch.Generator`` seeded from (seed, step, split, rank), so a resumed or
    distributed run draws reproducible batches; draw indices on the CPU, then move the
    batch to ``device``). ``split`` is ``"train"`` (weights) or ``"val"`` (architecture,
    evaluation)."""

    name: str

    def batch(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def split_size(self, split: str) -> int:
        """Number of examples in ``split`` (an epoch is ``split_size('train') / batch``)."""
        ...


def parse_value(text: str) -> Any:
    """``"64"`` -> 64, ``"0.5"`` -> 0.5, ``"true"`` -> True, otherwise the string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_assignment(text: str, *, what: str) -> tuple[str, str]:
    """``"name=value"`` -> ``("name", "value")`` or :class:`SpaceError`."""
    if "=" not in text:
        raise SpaceError(f"{what} {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    name, value = name.strip(), value.strip()
    if not name or not value:
        raise SpaceError(f"{what} {text!r}: expected NAME=VALUE with both parts non-empty")
    return name, value


def _coerce(value: Any, like: Any, what: str) -> Any:
    """Coerce a parsed value to the type of the default ``like``."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        raise SpaceError(f"{what}: expected true or false, got {value!r}")
    if isinstance(like, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpaceError(f"{what}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(like, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpaceError(f"{what}: expected a number, got {value!r}")
        return float(value)
    if isinstance(like, str):
        return str(value)
    return value


class SearchSpace:
    """Base class of search spaces (see the module docstring for the contract).

    ``SearchSpace(choices=None, hparams=None, preset=None)``: start from the class
    defaults, apply ``presets[preset]``, then the given overrides; then :meth:`check`.
    Instances are cheap, immutable in spirit, and JSON-describable via :meth:`config`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_choices: ClassVar[dict[str, list]] = {}
    default_hparams: ClassVar[dict[str, Any]] = {}
    #: named presets: ``{"preset": {"choices": {...}, "hparams": {...}}}``
    presets: ClassVar[dict[str, dict[str, dict]]] = {}
    #: the metric :meth:`evaluate` reports first (lower is better when ``minimize``)
    metric: ClassVar[str] = "loss"
    minimize: ClassVar[bool] = True
    #: the driver's defaults for this space (``SearchConfig`` field -> value)
    search_defaults: ClassVar[dict[str, Any]] = {}
    #: choices a layer can take on its own (hparam ``per_layer``; module docstring)
    layer_choices: ClassVar[tuple[str, ...]] = ()
    #: the depth choice whose largest value is the number of layers
    depth_choice: ClassVar[str | None] = None

    def __init__(
        self,
        choices: Mapping[str, Sequence] | None = None,
        hparams: Mapping[str, Any] | None = None,
        preset: str | None = None,
    ):
        ch = {n: list(v) for n, v in self.default_choices.items()}
        hp = dict(self.default_hparams)
        if preset is not None:
            if preset not in self.presets:
                known = ", ".join(sorted(self.presets)) or "none"
                raise SpaceError(f"space {self.name!r} has no preset {preset!r} (presets: {known})")
            p = self.presets[preset]
            ch.update({n: list(v) for n, v in p.get("choices", {}).items()})
            hp.update(p.get("hparams", {}))
        self.preset = preset
        layer_over: dict[tuple[str, int], list] = {}
        for n, v in (choices or {}).items():
            lc = self._layer_choice_of(n) if n not in ch else None
            if lc is not None:
                layer_over[lc] = list(v)
                continue
            if n not in ch:
                raise SpaceError(
                    f"space {self.name!r} has no choice {n!r} (choices: {', '.join(ch)})"
                )
            ch[n] = list(v)
        for n, v in (hparams or {}).items():
            if n not in hp:
                known = ", ".join(hp) or "none"
                raise SpaceError(f"space {self.name!r} has no hparam {n!r} (hparams: {known})")
            hp[n] = _coerce(v, self.default_hparams.get(n, hp[n]), f"hparam {n}")
        for n, vals in ch.items():
            if len(vals) == 0:
                raise SpaceError(f"choice {n!r}: needs at least one value")
            like = self.default_choices.get(n, [vals[0]])[0]
            ch[n] = [_coerce(v, like, f"choice {n}") for v in vals]
            if len(set(ch[n])) != len(ch[n]):
                raise SpaceError(f"choice {n!r}: duplicate values in {ch[n]}")
        self.hparams: dict[str, Any] = hp
        #: the shared values of each per-layer choice (``layer_choices`` -> values)
        self.layer_templates: dict[str, list] = {}
        self.choices: dict[str, list] = self._expand_layers(ch, layer_over)
        self.check()

    # ------------------------------------------------------------ per layer
    @property
    def per_layer(self) -> bool:
        """Whether the ``layer_choices`` are one choice per layer (hparam ``per_layer``)."""
        return bool(self.layer_choices) and bool(self.hparams.get("per_layer", False))

    def _layer_choice_of(self, name: str) -> tuple[str, int] | None:
        """``"heads_3"`` -> ``("heads", 3)`` for a per-layer choice name, else None."""
        base, sep, idx = name.rpartition("_")
        if sep and base in self.layer_choices and idx.isdigit():
            return base, int(idx)
        return None

    def layer_choice(self, name: str, layer: int) -> str:
        """The choice name that layer ``layer`` uses for the per-layer choice ``name``:
        ``name_<layer>`` with ``per_layer``, else ``name``."""
        return f"{name}_{layer}" if self.per_layer else name

    def _expand_layers(self, ch: dict[str, list], over: dict[tuple[str, int], list]) -> dict:
        if not self.per_layer:
            if over:
                names = ", ".join(f"{n}_{i}" for n, i in over)
                raise SpaceError(
                    f"space {self.name!r}: choice {names} is per layer; set the hparam "
                    f"per_layer=true (--hp per_layer=true) to use per-layer choices"
                )
            return ch
        L = max(int(v) for v in ch[self.depth_choice])
        for (n, i), vals in over.items():
            if i >= L:
                raise SpaceError(
                    f"choice {n}_{i}: layer {i} does not exist (the largest "
                    f"{self.depth_choice} is {L}: layers 0..{L - 1})"
                )
            like = ch[n][0]
            vals = [_coerce(v, like, f"choice {n}_{i}") for v in vals]
            if not vals or len(set(vals)) != len(vals):
                raise SpaceError(f"choice {n}_{i}: needs distinct values, got {vals}")
            over[(n, i)] = vals
        out: dict[str, list] = {}
        for n, vals in ch.items():
            if n in self.layer_choices:
                self.layer_templates[n] = list(vals)
                for i in range(L):
                    out[f"{n}_{i}"] = list(over.get((n, i), vals))
            else:
                out[n] = vals
        return out

    def layer_values(self, name: str) -> list:
        """Every value the choice ``name`` (a ``layer_choices`` name) can take in any layer."""
        if not self.per_layer:
            return list(self.choices[name])
        vals: dict = {}
        for n, v in self.choices.items():
            if self._layer_choice_of(n) is not None and self._layer_choice_of(n)[0] == name:
                vals.update(dict.fromkeys(v))
        return list(vals)

    # ---------------------------------------------------------------- describe
    def check(self) -> None:
        """Raise :class:`SpaceError` when a choice value or hparam cannot be taken."""

    def config(self) -> dict:
        """A JSON-able description; ``type(self).from_config(cfg)`` rebuilds the space."""
        choices = copy.deepcopy(self.choices)
        if self.per_layer:  # the shared values too: from_config then builds the same space
            choices = {**{n: self.layer_values(n) for n in self.layer_templates}, **choices}
        return {"name": self.name, "choices": choices, "hparams": dict(self.hparams)}

    @classmethod
    def from_config(cls, cfg: Mapping) -> SearchSpace:
        return cls(choices=cfg.get("choices"), hparams=cfg.get("hparams"))

    def num_architectures(self) -> int:
        return math.prod(len(v) for v in self.choices.values())

    def check_selection(self, selection: Mapping[str, Any]) -> dict:
        """A complete selection ``name -> value`` with every value one of the choice's."""
        out = {}
        for n, vals in self.choices.items():
            if n not in selection:
                raise SpaceError(f"selection: no value for choice {n!r}")
            v = selection[n]
            if v not in vals:
                raise SpaceError(f"selection: {n}={v!r} is not one of {vals}")
            out[n] = v
        extra = set(selection) - set(self.choices)
        if extra:
            raise SpaceError(f"selection: unknown choices {sorted(extra)}")
        return out

    def describe(self, selection: Mapping[str, Any]) -> str:
        """A short one-line form of a selection (progress bar); per-layer choices are
        listed as ``heads=4,2,6`` over the layers the selection's depth runs."""
        if not self.per_layer:
            return " ".join(f"{n}={selection[n]}" for n in self.choices)
        depth = int(selection[self.depth_choice])
        parts, done = [], set()
        for n in self.choices:
            lc = self._layer_choice_of(n)
            if lc is None:
                parts.append(f"{n}={selection[n]}")
            elif lc[0] not in done:
                done.add(lc[0])
                vals = [selection[f"{lc[0]}_{i}"] for i in range(depth)]
                parts.append(f"{lc[0]}={','.join(map(str, vals)) or '-'}")
        return " ".join(parts)

    def hard_arch(self, selection: Mapping[str, Any], device=None):
        """The one-hot :class:`~tangle_kernels.nn.arch.HardArch` of ``selection``."""
        from ..nn.arch import one_hot_arch

        return one_hot_arch(self.choices, self.check_selection(selection), device=device)

    def query_benchmark(self, selection: Mapping[str, Any], path: str) -> dict:
        """Recorded metrics of ``selection`` in the tabular benchmark file ``path``
        (spaces that have one override this); :class:`SpaceError` otherwise."""
        raise SpaceError(f"space {self.name!r} has no tabular benchmark to query")

    def restricted(self, selection: Mapping[str, Any]) -> SearchSpace:
        """The same space with every choice fixed to ``selection``'s value (per-layer
        choices of layers beyond the selected depth are dropped: those layers do not
        exist in the restricted space)."""
        sel = self.check_selection(selection)
        ch = {n: [v] for n, v in sel.items()}
        if self.per_layer:
            depth = int(sel[self.depth_choice])
            ch = {n: v for n, v in ch.items()
                  if (lc := self._layer_choice_of(n)) is None or lc[1] < depth}
        return type(self)(choices=ch, hparams=self.hparams)

    # -------------------------------------------------------------------- data
    def make_data(self, source: str | None) -> DataSource:
        """``source``: a path, ``"synthetic"``, or ``None`` (the space's default)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- model
    def build_supernet(self, data: DataSource) -> nn.Module:
        """The weight-entangled supernet (``tangle_kernels.nn`` modules only)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of ``model`` (supernet or plain) on ``batch``."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict:
        """Mean metrics over ``batches`` (default: the loss). The caller sets the arch."""
        was = model.training
        model.eval()
        try:
            losses = [float(self.loss(model, b)) for b in batches]
        finally:
            model.train(was)
        return {"loss": sum(losses) / max(1, len(losses))}

    # ---------------------------------------------------------- derive/extract
    def extract(self, model: nn.Module, selection: Mapping[str, Any]) -> nn.Module:
        """The sub-network ``selection`` as a plain module with the supernet's weights."""
        from .. import nn as tnn

        return tnn.extract(model, self.check_selection(selection))

    def build_plain(self, selection: Mapping[str, Any], data: DataSource) -> nn.Module:
        """A freshly initialised plain model of ``selection`` (for training from scratch):
        the supernet of the space restricted to ``selection`` (so every layer is
        initialised at the sub-network's own fan-in), extracted."""
        sub = self.restricted(selection)
        sel = {n: v for n, v in self.check_selection(selection).items() if n in sub.choices}
        return sub.extract(sub.build_supernet(data), sel)

    @staticmethod
    def param_count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())
