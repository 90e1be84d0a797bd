"""Hook points: one TransformerLens-style naming over the HF module tree, and a hook context.

``blocks.{L}.hook_resid_post`` is the output of decoder block ``L`` (see conventions.md). The
registry below is data: each entry says which HF submodule to hook, on which side (its input or
output), and in which order it fires within a block, so every backend resolves a name the same way.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookSpec:
    """Where a hook point lives in an HF decoder (``model.layers.{layer}...``) and its shape."""

    module: str  # path relative to the CausalLM, ``{layer}`` filled in
    side: str  # "input" (first positional arg) or "output" (first element if a tuple)
    order: int  # firing order within a block (nnsight needs execution order)
    shape: str
    tuple_index: int = 0  # which element of a tuple output


HOOK_SPECS: dict[str, HookSpec] = {
    "hook_resid_pre": HookSpec("model.layers.{layer}", "input", 0, "[batch, pos, d_model]"),
    "attn.hook_z": HookSpec("model.layers.{layer}.self_attn.o_proj", "input", 1, "[batch, pos, n_heads, head_dim]"),
    "attn.hook_pattern": HookSpec("model.layers.{layer}.self_attn", "output", 2, "[batch, n_heads, q_pos, k_pos]", 1),
    "hook_attn_out": HookSpec("model.layers.{layer}.self_attn", "output", 3, "[batch, pos, d_model]"),
    "hook_mlp_out": HookSpec("model.layers.{layer}.mlp", "output", 4, "[batch, pos, d_model]"),
    "hook_resid_post": HookSpec("model.layers.{layer}", "output", 5, "[batch, pos, d_model]"),
}
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    spec: HookSpec

    @property
    def module_path(self) -> str:
        return self.spec.module.format(layer=self.layer)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.layer, self.spec.order)


def hook_names(n_layers: int, kinds: tuple[str, ...] = tuple(HOOK_SPECS)) -> list[str]:
    """Every valid hook name for a model with ``n_layers`` blocks."""
    return [f"blocks.{layer}.{k}" for layer in range(n_layers) for k in kinds]


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """Resolve ``name``; unknown names and out-of-range layers raise with the valid choices."""
    m = _NAME.match(name)
    if not m or m.group(2) not in HOOK_SPECS:
        raise ValueError(
            f"unknown hook point {name!r}; valid names are blocks.L.<kind> with L in 0..{n_layers - 1} and "
            f"<kind> one of {sorted(HOOK_SPECS)} (e.g. 'blocks.0.hook_resid_post')"
        )
    layer = int(m.group(1))
    if layer >= n_layers:
        raise ValueError(f"hook point {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
    return HookPoint(name, layer, HOOK_SPECS[m.group(2)])


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _to_canonical(point: HookPoint, value: torch.Tensor, n_heads: int) -> torch.Tensor:
    if point.spec.module.endswith("o_proj"):  # [b, s, n_heads * head_dim] -> [b, s, n_heads, head_dim]
        return value.unflatten(-1, (n_heads, -1))
    return value


def _from_canonical(point: HookPoint, value: torch.Tensor) -> torch.Tensor:
    return value.flatten(-2) if point.spec.module.endswith("o_proj") else value


@contextmanager
def attach(model: nn.Module, hooks: Mapping[str, HookFn], n_layers: int, n_heads: int) -> Iterator[None]:
    """Run ``hooks`` (name -> fn(tensor) -> replacement or None) on an HF model's forward passes.

    The hooks are removed on exit, also when the forward pass raises.
    """
    handles = []
    try:
        for name, fn in hooks.items():
            point = parse_hook(name, n_layers)
            mod = get_module(model, point.module_path)
            if point.spec.side == "input":
                handles.append(mod.register_forward_pre_hook(_pre_hook(point, fn, n_heads), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(_post_hook(point, fn, n_heads)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_hook(point: HookPoint, fn: HookFn, n_heads: int):
    def hook(module, args, kwargs):
        if args:
            x, rest, in_kwargs = args[0], args[1:], False
        else:  # HF decoder layers take hidden_states as a keyword
            x, in_kwargs = kwargs["hidden_states"], True
        new = fn(_to_canonical(point, x, n_heads))
        if new is None:
            return None
        new = _from_canonical(point, new)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *rest), kwargs

    return hook


def _post_hook(point: HookPoint, fn: HookFn, n_heads: int):
    i = point.spec.tuple_index

    def hook(module, args, output):
        value = output[i] if isinstance(output, tuple) else output
        if value is None:
            raise RuntimeError(
                f"{point.name} is empty: attention patterns are only returned by eager attention; "
                "load the model with attn_implementation='eager'"
            )
        new = fn(_to_canonical(point, value, n_heads))
        if new is None:
            return None
        if isinstance(output, tuple):
            return (*output[:i], new, *output[i + 1 :])
        return new

    return hook
