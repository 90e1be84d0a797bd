"""Hook points: one TransformerLens-style naming over the HF module tree, as data.

``blocks.{L}.hook_resid_post`` is the output of decoder block ``L`` (see conventions.md). Each
:class:`HookSpec` in :data:`HOOK_SPECS` says which HF submodule to hook and on which side, in which
order it fires within a block, its canonical dims (and so its shape and stored row width for a
:class:`Geometry`), whether the module's tensor is split into heads, and whether it needs eager
attention. Every backend, the capture engine and the CLI read these fields; nothing else tests
hook names. :func:`select_hooks` expands user patterns (``blocks.*.hook_resid_post``,
``hook_resid_post``, ``blocks.2-5.attn.hook_z``) to hook names.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .models import Geometry

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
ROW_DIMS = ("batch", "pos", "q_pos")  # dims that index rows (token positions); the rest make up a row
_MASK: ContextVar[torch.Tensor | None] = ContextVar("reasonscope_attention_mask", default=None)


def compose_hooks(*hook_sets: Mapping[str, HookFn]) -> dict[str, HookFn]:
    """One hook set from several (``handle.run(ids, hooks=compose_hooks(vec.hooks(h), mine))``): where two sets hook
    one name, their functions run in the order given, each seeing the tensor the previous one returned (a dict merge
    would keep only the last)."""
    chains: dict[str, list[HookFn]] = {}
    for hooks in hook_sets:
        for name, fn in hooks.items():
            chains.setdefault(name, []).append(fn)
    return {name: fns[0] if len(fns) == 1 else _chain(fns) for name, fns in chains.items()}


def _chain(fns: list[HookFn]) -> HookFn:
    def run(x: torch.Tensor) -> torch.Tensor | None:
        out = None
        for fn in fns:
            y = fn(x if out is None else out)
            out = out if y is None else y
        return out

    return run


def current_mask() -> torch.Tensor | None:
    """The attention mask ``[batch, pos]`` of the ``ModelHandle.run`` pass in progress (None outside one; inside
    :func:`reasonscope.generation.generate` read ``current_batch()``)."""
    return _MASK.get()


@contextmanager
def masking(mask: torch.Tensor) -> Iterator[None]:
    """Make ``mask`` the :func:`current_mask` inside the block (``ModelHandle.run`` sets it for its pass)."""
    token = _MASK.set(mask)
    try:
        yield
    finally:
        _MASK.reset(token)


@dataclass(frozen=True)
class HookSpec:
    """One kind of hook point: where it lives in an HF decoder block and what its tensor looks like."""

    kind: str  # the name after ``blocks.L.``
    module: str  # path relative to the CausalLM, ``{layer}`` filled in
    side: Literal["input", "output"]  # first positional arg, or output (element ``tuple_index`` of a tuple)
    order: int  # firing order within a block (nnsight visits modules in execution order)
    dims: tuple[str, ...]  # canonical dims; sizes from the Geometry, or batch/pos/q_pos/k_pos given at run time
    tuple_index: int = 0
    splits_heads: bool = False  # the module's last dim ``n_heads * head_dim`` is split into ``[n_heads, head_dim]``
    needs_eager: bool = False  # only eager attention materialises this tensor
    editable: bool = True  # False: the module has used the tensor when its output hook runs (read-only on hf, nnsight)

    @property
    def shape(self) -> str:
        """The canonical shape as text, e.g. ``[batch, pos, d_model]``."""
        return "[" + ", ".join(self.dims) + "]"

    @property
    def per_key(self) -> bool:
        """Rows hold one value per key position (attention patterns): width depends on the key length."""
        return "k_pos" in self.dims

    def size(self, geometry: Geometry, batch: int, pos: int) -> tuple[int, ...]:
        """The canonical tensor shape for a ``[batch, pos]`` input."""
        runtime = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": pos}
        return tuple(runtime[d] if d in runtime else int(getattr(geometry, d)) for d in self.dims)

    def width(self, geometry: Geometry, n_keys: int | None = None) -> int:
        """Values per stored row (one token position); ``n_keys`` is required for per-key hooks."""
        sizes = {"k_pos": n_keys}
        if self.per_key and n_keys is None:
            raise ValueError(f"{self.kind}: a row's width depends on the number of keys; pass n_keys")
        return math.prod(
            int(sizes[d] or 0) if d in sizes else int(getattr(geometry, d)) for d in self.dims if d not in ROW_DIMS
        )

    def to_canonical(self, value: torch.Tensor, n_heads: int) -> torch.Tensor:
        """The module's tensor in canonical dims (``[.., n_heads * head_dim]`` -> ``[.., n_heads, head_dim]``)."""
        return value.unflatten(-1, (n_heads, -1)) if self.splits_heads else value

    def from_canonical(self, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_canonical`, for a hook that returns a replacement."""
        return value.flatten(-2) if self.splits_heads else value


_SPECS = [
    HookSpec("hook_resid_pre", "model.layers.{layer}", "input", 0, ("batch", "pos", "d_model")),
    HookSpec(
        "attn.hook_z",
        "model.layers.{layer}.self_attn.o_proj",
        "input",
        1,
        ("batch", "pos", "n_heads", "head_dim"),
        splits_heads=True,
    ),
    HookSpec(
        "attn.hook_pattern",
        "model.layers.{layer}.self_attn",
        "output",
        2,
        ("batch", "n_heads", "q_pos", "k_pos"),
        tuple_index=1,
        needs_eager=True,
        editable=False,
    ),
    HookSpec("hook_attn_out", "model.layers.{layer}.self_attn", "output", 3, ("batch", "pos", "d_model")),
    HookSpec("hook_mlp_out", "model.layers.{layer}.mlp", "output", 4, ("batch", "pos", "d_model")),
    HookSpec("hook_resid_post", "model.layers.{layer}", "output", 5, ("batch", "pos", "d_model")),
]
HOOK_SPECS: dict[str, HookSpec] = {s.kind: s for s in _SPECS}
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PATTERN = re.compile(r"^blocks\.([^.]+)\.(.+)$")
_EAGER_HINT = "load the model with attn_implementation='eager' (CLI: it is chosen for you)"


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook name: its layer and :class:`HookSpec`."""

    name: str
    layer: int
    spec: HookSpec

    @property
    def module_path(self) -> str:
        return self.spec.module.format(layer=self.layer)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.layer, self.spec.order)


def hook_names(n_layers: int, kinds: Iterable[str] = tuple(HOOK_SPECS)) -> list[str]:
    """Every valid hook name for a model with ``n_layers`` blocks, in execution order."""
    kinds = tuple(kinds)
    return [f"blocks.{layer}.{k}" for layer in range(n_layers) for k in HOOK_SPECS if k in kinds]


def _valid_names_hint(n_layers: int) -> str:
    return (
        f"valid names are blocks.L.<kind> with L in 0..{n_layers - 1} and <kind> one of {list(HOOK_SPECS)} "
        "(e.g. 'blocks.0.hook_resid_post'); patterns: 'blocks.*.<kind>', 'blocks.2-5.<kind>' or a bare <kind>"
    )


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """Resolve ``name``; unknown names and out-of-range layers raise with the valid choices."""
    m = _NAME.match(name)
    if not m or m.group(2) not in HOOK_SPECS:
        raise ValueError(f"unknown hook point {name!r}; {_valid_names_hint(n_layers)}")
    layer = int(m.group(1))
    if layer >= n_layers:
        raise ValueError(f"hook point {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
    return HookPoint(name, layer, HOOK_SPECS[m.group(2)])


def _layers(sel: str, pattern: str, n_layers: int) -> range:
    if sel == "*":
        return range(n_layers)
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", sel)
    if not m:
        raise ValueError(
            f"hook pattern {pattern!r}: layer {sel!r} is not a number, a range A-B or '*'; "
            f"{_valid_names_hint(n_layers)}"
        )
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo > hi:
        raise ValueError(f"hook pattern {pattern!r}: empty layer range {sel}; write it low-high, e.g. {hi}-{lo}")
    if hi >= n_layers:
        raise ValueError(
            f"hook pattern {pattern!r}: layer {hi} is out of range; this model has layers 0..{n_layers - 1}"
        )
    return range(lo, hi + 1)


def select_hooks(patterns: str | Sequence[str], n_layers: int) -> list[str]:
    """Expand hook patterns to hook names, deduplicated, in execution order (layer, then firing order).

    ``patterns`` is a comma-separated string or a list of them; each pattern is a hook name, a bare
    kind (``hook_resid_post``: every layer), or ``blocks.<layers>.<kind>`` with ``<layers>`` one of
    ``L``, ``A-B`` (inclusive) or ``*`` and ``<kind>`` a kind or a glob (``attn.*``).
    """
    parts = [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(p, str) for p in parts):
        raise TypeError(f"hook patterns must be strings, got {patterns!r}")
    pats = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    if not pats:
        raise ValueError(f"no hook selected; {_valid_names_hint(n_layers)}")
    chosen: set[tuple[int, str]] = set()
    for pat in pats:
        m = _PATTERN.match(pat)
        layer_sel, kind_sel = (m.group(1), m.group(2)) if m else ("*", pat)
        kinds = [k for k in HOOK_SPECS if fnmatch.fnmatchcase(k, kind_sel)]
        if not kinds:
            raise ValueError(f"unknown hook point {pat!r}: no kind matches {kind_sel!r}; {_valid_names_hint(n_layers)}")
        chosen |= {(layer, k) for layer in _layers(layer_sel, pat, n_layers) for k in kinds}
    return [f"blocks.{layer}.{k}" for layer, k in sorted(chosen, key=lambda lk: (lk[0], HOOK_SPECS[lk[1]].order))]


def needs_eager(names: Iterable[str]) -> bool:
    """Whether any of the hook ``names`` needs eager attention (unknown names do not)."""
    specs = [HOOK_SPECS.get(m.group(2)) if (m := _NAME.match(n)) else None for n in names]
    return any(s is not None and s.needs_eager for s in specs)


def expand_hooks(hooks: Mapping[str, HookFn], n_layers: int) -> dict[str, HookFn]:
    """``{pattern: fn}`` -> ``{hook name: fn}``; a name matched by two patterns is an error."""
    out: dict[str, HookFn] = {}
    for pattern, fn in hooks.items():
        for name in select_hooks(pattern, n_layers):
            if name in out:
                raise ValueError(
                    f"hook {name!r} is selected by two patterns of `hooks`; give each hook one function "
                    "(compose_hooks chains several)"
                )
            out[name] = fn
    return out


def check_attention(names: Iterable[str], attn_implementation: str | None) -> None:
    """Raise when a hook needs eager attention and the model runs another implementation."""
    eager = [n for n in names if needs_eager([n])]
    if eager and attn_implementation != "eager":
        raise ValueError(
            f"{eager[0]} needs eager attention (attention patterns are not materialised by "
            f"{attn_implementation!r} attention); {_EAGER_HINT}"
        )


def check_replacement(name: str, new: object, old: torch.Tensor, editable: bool = True) -> torch.Tensor | None:
    """A hook's return value: ``None`` (keep the activation) or a tensor of the activation's shape, cast to its
    dtype and device (``x + v`` with a float32 ``v`` on a bfloat16 model). ``editable=False``: only ``None``."""
    if new is None:
        return None
    if not isinstance(new, torch.Tensor):
        raise TypeError(
            f"the hook function for {name} returned {type(new).__name__}; return None to only read the "
            "activation, or a tensor of its shape to replace it"
        )
    if not editable:
        raise ValueError(
            f"{name} is read-only on this backend: the attention weights have met the values when its hook runs, so "
            "a replacement would change nothing; edit the heads' outputs (attn.hook_z) instead, or, outside generate, "
            "load the model with backend='transformer_lens', whose pattern hook runs before the values"
        )
    if new.shape != old.shape:
        raise ValueError(
            f"the hook function for {name} returned shape {tuple(new.shape)}; a replacement must keep "
            f"the activation's shape {tuple(old.shape)}"
        )
    return new.to(device=old.device, dtype=old.dtype)


def get_module(model: Any, path: str) -> Any:
    """The submodule at a dotted ``path`` (integers index module lists); works on nnsight envoys too."""
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


@contextmanager
def attach(
    model: nn.Module, hooks: Mapping[str, HookFn], n_layers: int, n_heads: int, pure: bool = False
) -> Iterator[None]:
    """Run ``hooks`` (name -> fn(tensor) -> replacement or None) on an HF model's forward passes.

    ``pure``: the functions keep no tensor beyond the pass (e.g. a steering add), so a generation may run them
    under ``torch.inference_mode`` (see :func:`may_keep_tensors`). The hooks are removed on exit, also when the
    forward pass raises.
    """
    hooks = expand_hooks(hooks, n_layers)  # patterns (blocks.*.hook_resid_post) as in ModelHandle.run
    check_attention(hooks, getattr(model.config, "_attn_implementation", None))
    handles = []
    try:
        for name, fn in hooks.items():
            point = parse_hook(name, n_layers)
            mod = get_module(model, point.module_path)
            if point.spec.side == "input":
                hook = _pre_hook(point, fn, n_heads)
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = _post_hook(point, fn, n_heads)
                handles.append(mod.register_forward_hook(hook))
            setattr(hook, _PURE, pure)
        yield
    finally:
        for h in handles:
            h.remove()


_PURE = "reasonscope_pure"  # attribute of a torch hook that attach(pure=True) registered
_CAPTURING = "transformers.utils.output_capturing"  # records only what a call asks for (output_hidden_states=...)


def may_keep_tensors(model: nn.Module) -> bool:
    """Whether a forward hook (a global one, or one on a module of ``model``) could keep a tensor of a pass: any
    hook but those of ``attach(..., pure=True)`` and transformers' own output-capturing hooks."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(
        not getattr(fn, _PURE, False) and getattr(fn, "__module__", None) != _CAPTURING
        for m in model.modules()
        for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def _pre_hook(point: HookPoint, fn: HookFn, n_heads: int) -> Callable[..., Any]:
    spec = point.spec

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            x, rest, in_kwargs = args[0], args[1:], False
        else:  # HF decoder layers take hidden_states as a keyword
            x, rest, in_kwargs = kwargs["hidden_states"], (), True
        canon = spec.to_canonical(x, n_heads)
        new = check_replacement(point.name, fn(canon), canon)
        if new is None:
            return None
        new = spec.from_canonical(new)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *rest), kwargs

    return hook


def _post_hook(point: HookPoint, fn: HookFn, n_heads: int) -> Callable[..., Any]:
    spec, i = point.spec, point.spec.tuple_index

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        value = output[i] if isinstance(output, tuple) else output
        if value is None:
            raise RuntimeError(f"{point.name} is empty; {_EAGER_HINT}")
        canon = spec.to_canonical(value, n_heads)
        new = check_replacement(point.name, fn(canon), canon, spec.editable)
        if new is None:
            return None
        new = spec.from_canonical(new)
        if isinstance(output, tuple):
            return (*output[:i], new, *output[i + 1 :])
        return new

    return hook
