"""What the image-classification spaces share: data (:mod:`tangle_kernels.data.vision`),
cross-entropy loss, accuracy, the tabular-benchmark query, and a MAC counter.

Cost conventions (every space's ``arch_params`` / ``arch_macs`` formulas follow them):

- parameters: every trainable parameter of the plain sub-network (BatchNorm / LayerNorm
  affine parameters included, running statistics not);
- MACs (multiply-accumulates per image): convolutions ``H_out W_out C_out (C_in/groups)
  k_h k_w``, linear layers ``tokens x in x out``, and for self-attention the two
  matrix products ``2 T^2 (heads x head_dim)``; normalisation, activations, pooling and
  additions are not counted. :func:`count_macs` measures the same with forward hooks on
  the plain modules of an extracted network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import SearchSpace, SpaceError

__all__ = ["VisionSpace", "count_macs", "count_params"]


def count_params(model: nn.Module) -> int:
    """Trainable parameters of ``model`` (shared tensors once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per image of one forward pass of ``x`` through a plain ``model``, counted by
    forward hooks on ``nn.Conv2d``, ``nn.Linear`` and
    :class:`tangle_kernels.nn.plain.SelfAttention` (see the module docstring)."""
    from ..nn.plain import SelfAttention

    total = [0]
    n = x.shape[0]

    def conv_hook(m: nn.Conv2d, inp, out):
        total[0] += out.numel() // n * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        total[0] += out.numel() // n * m.in_features

    def attn_hook(m: SelfAttention, inp, out):
        T = inp[0].shape[1]
        total[0] += 2 * T * T * m.num_heads * m.head_dim

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SelfAttention):
            hooks.append(m.register_forward_hook(attn_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total[0]


class VisionSpace(SearchSpace):
    """Base of the image-classification spaces.

    Subclasses set ``dataset`` (a key of :data:`tangle_kernels.data.vision.DATASETS`) and
    hparams ``image_size``, ``num_classes``, ``in_channels`` and (optionally)
    ``n_train``/``n_val`` (synthetic split sizes), ``val`` ("half" or "test").
    """

    dataset = "cifar10"
    metric = "loss"
    minimize = True

    # ------------------------------------------------------------------ data
    def image_shape(self) -> tuple[int, int, int]:
        hp = self.hparams
        return (hp["in_channels"], hp["image_size"], hp["image_size"])

    def make_data(self, source: str | None):
        from ..data.vision import open_image_data

        hp = self.hparams
        data = open_image_data(
            source, dataset=self.dataset, val=hp.get("val", "half"),
            image_size=hp["image_size"], seed=hp.get("data_seed", 0),
            synthetic={"shape": self.image_shape(), "num_classes": hp["num_classes"],
                       "n_train": hp.get("n_train", 512), "n_val": hp.get("n_val", 256),
                       "seed": hp.get("data_seed", 0)})
        self.check_data(data)
        return data

    def check_data(self, data) -> None:
        shape = tuple(getattr(data, "image_shape", ()))
        if shape and shape != self.image_shape():
            raise SpaceError(
                f"space {self.name!r}: the data's images are {'x'.join(map(str, shape))} but the "
                f"space expects {'x'.join(map(str, self.image_shape()))} (hparams in_channels, "
                f"image_size)"
            )
        nc = getattr(data, "num_classes", None)
        if nc is not None and nc > self.hparams["num_classes"]:
            raise SpaceError(
                f"space {self.name!r}: the data has {nc} classes, more than hparam "
                f"num_classes={self.hparams['num_classes']}"
            )

    # ------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Mean cross-entropy and top-1 accuracy (in %) over ``batches``."""
        was = model.training
        model.eval()
        tot_loss, correct, n = 0.0, 0, 0
        try:
            for x, y in batches:
                logits = model(x)
                tot_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                n += len(y)
        finally:
            model.train(was)
        n = max(n, 1)
        return {"loss": tot_loss / n, "acc": 100.0 * correct / n}

    # ------------------------------------------------------------- costs
    def arch_params(self, selection: Mapping[str, Any]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def arch_macs(self, selection: Mapping[str, Any]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------- benchmark
    def query_benchmark(self, selection: Mapping[str, Any], path: str) -> dict:
        """Recorded metrics of ``selection`` in the tabular benchmark file ``path`` (JSON
        or CSV keyed by :meth:`genotype_key`)."""
        if not hasattr(self, "genotype_key"):
            raise SpaceError(f"space {self.name!r} has no tabular benchmark to query")
        from ..tabular import BenchmarkError, query_selection

        try:
            key, metrics = query_selection(self, self.check_selection(selection), path)
        except BenchmarkError as e:
            raise SpaceError(str(e)) from None
        return {"key": key, **metrics}
