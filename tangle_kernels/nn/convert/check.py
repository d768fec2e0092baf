"""The data-flow check of :func:`~tangle_kernels.nn.entangle` on the meta device: the
sub-networks of the smallest and the largest choice are extracted (weights as meta
tensors: no memory, no compute) and run in eval mode on the example inputs (on the
real device, the sub-networks copied, where the model reads tensor values and cannot
run on the meta device); a shape error names the layer that failed, its type, its
input shape, and the last entangled layer that ran before it (the producer of a width
the consumer does not follow)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..base import EntangledModule

__all__ = ["check_flow", "to_meta"]


def to_meta(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (ties kept)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else meta
        )
    return copy.deepcopy(model, memo)


def _meta_inputs(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (
            torch.empty_like(x, device="meta")
            if x.is_floating_point()
            else torch.zeros_like(x, device="meta")
        )
    if isinstance(x, tuple):
        return tuple(_meta_inputs(v) for v in x)
    if isinstance(x, list):
        return [_meta_inputs(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _meta_inputs(v) for k, v in x.items()}
    return x


class _eval:
    """Eval mode inside the block; every module's training flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _shape(x: Any):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return tuple(x[0].shape)
    return None


def _run_traced(model: nn.Module, inputs: Any, entangled: set[str]):
    """Run ``model``; on an exception ``(failing path, module, input shape, producer
    path, producer module, producer output shape, error)``, else None."""
    names = {id(m): p for p, m in model.named_modules()}
    stack: list[tuple[str, nn.Module, Any]] = []
    done: list[tuple[str, nn.Module, Any]] = []
    handles = []

    def pre(mod, args):
        stack.append((names.get(id(mod), "?"), mod, _shape(args)))

    def post(mod, args, out):
        p, m, _ = stack.pop()
        done.append((p, m, _shape(out)))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            _call(model, inputs)
        return None
    except Exception as e:  # noqa: BLE001 - reported with the module that raised it
        path, mod, shape = stack[-1] if stack else ("", model, None)
        prod = next(((p, m, s) for p, m, s in reversed(done) if p in entangled), None)
        return path, mod, shape, prod, e
    finally:
        for h in handles:
            h.remove()


def check_flow(original: nn.Module, supernet: nn.Module, example_inputs: Any) -> None:
    """Raise ``ValueError`` when a sub-network of the smallest or the largest choice of
    ``supernet`` (made from ``original`` by entangle) does not run on
    ``example_inputs`` (see the module docstring). ``original`` itself must run on
    the meta device."""
    from . import extract

    inputs = _meta_inputs(example_inputs)
    res = _run_traced(to_meta(original).eval(), inputs, set())
    on_meta = res is None
    if not on_meta:
        # Code that reads values (``.item()``, data-dependent masks) cannot run on the
        # meta device: check on the real device instead (sub-network copies, eval mode).
        inputs = example_inputs
        with _eval(original):
            res = _run_traced(original, inputs, set())
        if res is not None:
            path, mod, shape, _, e = res
            raise ValueError(
                f"example_inputs: the original model does not run on them ({path or 'model'} "
                f"({type(mod).__name__}): {type(e).__name__}: {e})"
            )
    meta = to_meta(supernet).eval() if on_meta else supernet
    choices: dict[str, tuple] = {}
    entangled: set[str] = set()
    for p, m in meta.named_modules():
        if isinstance(m, EntangledModule):
            choices.update(m.choices)
            if not any(p.startswith(q + ".") for q in entangled):
                entangled.add(p)
    if not choices:
        return
    for label, pick in (("smallest", min), ("largest", max)):
        sel = {n: pick(v) for n, v in choices.items()}
        child = extract(meta, sel).eval()
        res = _run_traced(child, inputs, entangled)
        if res is None:
            continue
        path, mod, shape, prod, e = res
        msg = (
            f"entangle: the sub-network of the {label} choice {sel} does not run: "
            f"{path or 'the model'} ({type(mod).__name__}) failed on an input of shape {shape} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
        if prod is not None and prod[0] != path:
            msg += (
                f"; the last entangled module before it is {prod[0]!r} ({type(prod[1]).__name__}, "
                f"output shape {prod[2]}): entangle the input width of {path!r} with the same "
                "choice (a consumer left unentangled)"
            )
        raise ValueError(msg)
