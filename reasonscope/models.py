"""``load_model``: one handle over a local HF directory, a hub id or a model organism.

Three backends share the hook naming of :mod:`reasonscope.hooks`:

- ``"hf"`` (default): the plain ``transformers`` model with PyTorch hooks;
- ``"transformer_lens"``: ``TransformerBridge.boot_transformers`` (eager attention);
- ``"nnsight"``: ``nnsight.TransformersModel(..., task="text-generation", dispatch=True)``.

``handle.run(input_ids, attention_mask, hooks={name: fn})`` runs a forward pass through the
chosen backend, calling ``fn(activation)`` at each named hook point (a returned tensor replaces
the activation), and gives the logits. Hook names may be patterns (:func:`reasonscope.hooks.select_hooks`).
``handle.run_hidden(...)`` stops at the final norm (``handle.unembed`` of it gives the logits), and
``handle.run_chunks(...)`` gives the logits a run of positions at a time, within the logit budget.
``handle.run_with_cache(input_ids, attention_mask, names)`` gives the activations at ``names`` instead; that pass
stops after the last of them, so no logits are computed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

import torch

from .dtypes import torch_dtype as to_torch_dtype
from .hooks import (
    HookFn,
    attach,
    check_attention,
    check_replacement,
    expand_hooks,
    get_module,
    hook_names,
    masking,
    parse_hook,
    select_hooks,
)
from .traces.record import THINK_END, THINK_START

Backend = Literal["hf", "transformer_lens", "nnsight"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
ORGANISM_DIR = Path(__file__).parent / "organisms" / "weights"
ORGANISMS = ("thinking", "base")
# any one of these makes a directory loadable by AutoTokenizer (fast, config, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for an HF model's forward: ``cache`` where it takes that (transformers 5.24 renamed
    ``past_key_values``, which goes in 5.40), else ``past_key_values``."""
    cls = type(getattr(model, "_orig_mod", model))  # a torch.compile wrapper forwards to the model it holds
    if cls not in _CACHE_NAMES:
        _CACHE_NAMES[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return {_CACHE_NAMES[cls]: cache}


_CACHE_NAMES: dict[type, str] = {}


class ModelNotFoundError(FileNotFoundError):
    """No model could be resolved from the given source; the message lists what was tried."""


@dataclass(frozen=True)
class Geometry:
    """Attention geometry; query head ``h`` reads KV head ``h // group_size``."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_config(cls, cfg: Any) -> Geometry:
        cfg = getattr(cfg, "text_config", cfg)
        n_heads = cfg.num_attention_heads
        return cls(
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            d_model=cfg.hidden_size,
        )


@dataclass
class ModelHandle:
    """A loaded model: the HF module, its tokenizer, think markers, geometry and backend wrapper."""

    model: Any  # the underlying transformers PreTrainedModel (always available)
    tokenizer: Any
    source: str  # what was passed to load_model
    path: str  # resolved local directory or hub id
    backend: Backend = "hf"
    wrapper: Any = None  # TransformerBridge or nnsight.TransformersModel, when that backend is chosen
    meta: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_config(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def attn_implementation(self) -> str | None:
        """The attention implementation the model runs (``"eager"``, ``"sdpa"``, ...)."""
        return getattr(self.model.config, "_attn_implementation", None)

    @property
    def think_start(self) -> str:
        return THINK_START

    @property
    def think_end(self) -> str:
        return THINK_END

    @cached_property
    def think_ids(self) -> tuple[int | None, int | None]:
        """Token ids of ``<think>``/``</think>`` (None where the vocabulary lacks one)."""
        vocab = self.tokenizer.get_vocab()
        return vocab.get(THINK_START), vocab.get(THINK_END)

    @property
    def hook_names(self) -> list[str]:
        return hook_names(self.geometry.n_layers)

    @cached_property
    def weight_hash(self) -> str:
        """Content hash of the weights, the same for any path or backend (:func:`reasonscope.identity.weight_hash`)."""
        from .identity import weight_hash

        return weight_hash(self.model)

    @contextlib.contextmanager
    def in_float32(self) -> Iterator[None]:
        """Run the model in float32 inside the block: low-precision weights and buffers are cast in place and cast
        back on exit, also when the block raises (exactly: float32 holds every bfloat16 and float16 value). For
        computations that low precision drowns, such as second finite differences. Costs float32 weight memory."""
        tensors = [t for _, t in (*self.model.named_parameters(), *self.model.named_buffers())]
        dtypes = [t.dtype for t in tensors]
        low = [i for i, t in enumerate(tensors) if t.dtype in (torch.bfloat16, torch.float16)]
        hashed = "weight_hash" in self.__dict__
        try:
            for i in low:
                tensors[i].data = tensors[i].data.float()
            yield
        except torch.OutOfMemoryError:
            raise MemoryError(
                f"{self.source} ran out of memory on {self.device} in float32 (this computation needs it); use a "
                "device with about twice the memory of the low-precision weights"
            ) from None
        finally:
            for i in low:
                tensors[i].data = tensors[i].data.to(dtypes[i])
            if not hashed:  # a hash taken inside would describe the float32 copy
                self.__dict__.pop("weight_hash", None)

    def left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[batch, width]`` left-padded with the tokenizer's pad id (0 without one), and their mask."""
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in seqs])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
        return ids, mask

    def chat_prompt(self, question: str, thinking: bool | None = None) -> str:
        """The generation prompt for ``question`` through the tokenizer's chat template.

        For a model whose template does not open ``<think>`` itself, ``thinking=True`` appends it.
        """
        messages = [{"role": "user", "content": question}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = question
        if thinking and not text.rstrip().endswith(self.think_start):
            text = text + self.think_start + "\n"
        return text

    def decoder(self) -> Any:
        """The transformers model that decodes with a KV cache (:func:`reasonscope.generation.generate`, head evals).

        TransformerLens' bridge rewrites the model's blocks in place and they keep no KV cache, so a decode step
        would see no past and write wrong tokens without an error: a ``transformer_lens`` handle refuses."""
        if self.backend == "transformer_lens":
            raise ValueError(
                f"{self.source} was loaded with backend='transformer_lens', whose bridge keeps no KV cache, so "
                "generation would write wrong tokens; generate with load_model(..., backend='hf') or 'nnsight' (hooks "
                "and steering vectors apply the same way), and keep the transformer_lens handle for run/run_with_cache"
            )
        return self.model

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hooks: Mapping[str, HookFn] | None = None,
    ) -> torch.Tensor:
        """Forward pass through the backend with ``hooks``; returns logits ``[batch, pos, vocab]``.

        ``hooks`` maps hook names or patterns (``blocks.*.hook_resid_post``) to functions. Position ids
        follow the attention mask, so left-padded rows equal their unpadded selves.
        """
        g = self.geometry
        hooks = expand_hooks(hooks or {}, g.n_layers)
        check_attention(hooks, self.attn_implementation)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with masking(attention_mask):  # hooks that steer a row's last token find it (current_mask)
            if self.backend == "hf":
                with attach(self.model, hooks, g.n_layers, g.n_heads):
                    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
                    return out.logits
            if self.backend == "transformer_lens":
                fwd = [(name, _tl_hook(name, fn)) for name, fn in hooks.items()]
                return self.wrapper.run_with_hooks(input_ids, attention_mask=attention_mask, fwd_hooks=fwd)
            return self._run_nnsight(input_ids, attention_mask, position_ids, hooks)

    @cached_property
    def _final_norm(self) -> Any:
        """The module whose output the unembedding reads; None where the logits are more than that unembedding
        (no ``norm`` module on the decoder, a logit soft-cap or scale)."""
        cfg = self.model.config
        if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale")):
            return None
        return getattr(self.model.get_decoder(), "norm", None)

    def run_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hooks: Mapping[str, HookFn] | None = None,
    ) -> torch.Tensor:
        """What the unembedding reads, ``[batch, pos, d_model]``: ``unembed(run_hidden(...))`` equals :meth:`run`.

        The pass stops at the final norm (every backend, with ``hooks``; gradients flow), so a long pass keeps
        ``d_model`` numbers a position, not ``vocab``. Models whose logits are more than the unembedding of the final
        norm's output (a logit soft-cap or scale) give their logits here, and :meth:`unembed` is the identity.
        """
        norm = self._final_norm
        if norm is None:
            return self.run(input_ids, attention_mask, hooks)
        seen: list[torch.Tensor] = []

        def final(module: Any, args: Any, output: torch.Tensor) -> None:
            seen.append(output)
            raise StopForward

        grab = norm.register_forward_hook(final)
        try:
            with contextlib.suppress(StopForward):
                self.run(input_ids, attention_mask, hooks)
        finally:
            grab.remove()
        return seen[0]

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of :meth:`run_hidden`'s output (any positions of it)."""
        return hidden if self._final_norm is None else self.model.get_output_embeddings()(hidden)

    def run_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hooks: Mapping[str, HookFn] | None = None,
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """The logits of one pass, a run of positions at a time: ``(positions, logits[:, positions])``, each chunk's
        ``[batch, chunk, vocab]`` within :data:`reasonscope.budget.LOGIT_BUDGET` (at least one position).

        One :meth:`run_hidden` pass; each chunk's positions are unembedded only when it is asked for, so one long row
        on a 150k vocabulary never holds its whole ``[pos, vocab]`` logits.
        """
        from . import budget

        hidden = self.run_hidden(input_ids, attention_mask, hooks)
        batch, width = input_ids.shape
        step = budget.rows_per_pass(batch, budget.vocab_size(self))  # positions of every row within the budget
        for a in range(0, width, step):
            yield slice(a, a + step), self.unembed(hidden[:, a : a + step])

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        names: str | Sequence[str] = "blocks.*.hook_resid_post",
        hooks: Mapping[str, HookFn] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Activations at ``names`` (patterns allowed), canonical shapes, detached, on the model's device.

        ``hooks`` act first, so a cached point holds what they returned. The pass stops once every point is cached
        (every backend; TransformerLens fires ``hook_pattern`` before ``hook_z``): neither the later blocks nor the
        unembedding run (no ``[batch, pos, vocab]`` logits, the largest tensor of a long pass on a 150k vocabulary).
        """
        g = self.geometry
        wanted = select_hooks(names, g.n_layers)
        edits = expand_hooks(hooks or {}, g.n_layers)
        cache: dict[str, torch.Tensor] = {}

        def reader(name: str) -> HookFn:
            edit = edits.get(name)
            # as the backend's own hook would check it (the pass may stop before that check runs)
            editable = self.backend == "transformer_lens" or parse_hook(name, g.n_layers).spec.editable

            def fn(x: torch.Tensor) -> torch.Tensor | None:
                new = check_replacement(name, edit(x), x, editable) if edit is not None else None
                cache[name] = (x if new is None else new).detach()
                if len(cache) == len(wanted):  # every point cached, whatever order the backend fires them in
                    raise StopForward
                return new

            return fn

        with contextlib.suppress(StopForward):
            self.run(input_ids, attention_mask, hooks={**edits, **{n: reader(n) for n in wanted}})
        return cache

    def _run_nnsight(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        hooks: dict[str, HookFn],
    ) -> torch.Tensor:
        g = self.geometry
        points = sorted((parse_hook(n, g.n_layers) for n in hooks), key=lambda p: p.sort_key)
        lm = self.wrapper
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        with lm.trace(inputs):
            for p in points:  # nnsight 0.8 runs this body alongside the model: visit in execution order
                env = get_module(lm, p.module_path)
                if p.spec.side == "input":
                    value = env.input
                else:
                    out = env.output
                    value = out[p.spec.tuple_index] if isinstance(out, tuple) else out
                canon = p.spec.to_canonical(value, g.n_heads)
                new = check_replacement(p.name, hooks[p.name](canon), canon, p.spec.editable)
                if new is not None:
                    new = p.spec.from_canonical(new)
                    if p.spec.side == "input":
                        env.input = new
                    elif isinstance(env.output, tuple):
                        env.output = (*env.output[: p.spec.tuple_index], new, *env.output[p.spec.tuple_index + 1 :])
                    else:
                        env.output = new
            logits = lm.output.logits.save()
        return logits


class StopForward(Exception):
    """Raised by a hook after the last point a pass needs, to skip the rest of the forward pass."""


def _tl_hook(name: str, fn: HookFn) -> Callable[[torch.Tensor, Any], torch.Tensor | None]:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor | None:  # TransformerLens passes (activation, hook)
        return check_replacement(name, fn(tensor), tensor)

    return hook


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(source: str | os.PathLike) -> str:
    """Map ``source`` to a local directory or a reachable hub id, or raise listing what was tried."""
    source = str(source)
    tried = []
    if source.startswith("organism:"):
        name = source.split(":", 1)[1]
        path = ORGANISM_DIR / name
        if name not in ORGANISMS:
            raise ModelNotFoundError(f"unknown organism {name!r}; choose one of {['organism:' + o for o in ORGANISMS]}")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"organism weights missing at {path}; run `reasonscope organism train --out {ORGANISM_DIR}`"
            )
        return str(path)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path)
        tried.append(f"local directory {path}: has no config.json")
    else:
        tried.append(f"local directory {path}: does not exist")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            if isinstance(cached, str):
                return source
            tried.append(f"hub cache: {source} is not cached")
        except Exception as e:  # noqa: BLE001 - a broken cache must not hide the real error
            tried.append(f"hub cache: {e}")
        if _hub_reachable():
            return source
        tried.append(
            "hub: unreachable (offline); download the model on a connected machine and pass its local directory"
        )
    tried.append(f"organisms: use one of {['organism:' + o for o in ORGANISMS]}")
    raise ModelNotFoundError(f"cannot load model {source!r}. Tried:\n  - " + "\n  - ".join(tried))


def load_geometry(source: str | os.PathLike) -> Geometry:
    """The :class:`Geometry` of ``source`` from its config alone (no weights loaded): for early validation."""
    from transformers import AutoConfig

    return Geometry.from_config(AutoConfig.from_pretrained(resolve_source(source)))


def load_model(
    source: str | os.PathLike,
    backend: Backend = "hf",
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
) -> ModelHandle:
    """Load a causal LM from a local HF directory, a hub id or ``organism:thinking|base``.

    ``device="auto"`` picks CUDA when present. ``device_map="auto"`` is passed through to
    ``from_pretrained`` for models larger than one GPU (then ``device`` is ignored).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    torch_dtype = to_torch_dtype(dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_source(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the tokenizer beside the "
            f"weights: tokenizer.save_pretrained({str(path)!r})"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if backend == "transformer_lens":
        attn_implementation = "eager"  # TransformerBridge forces eager for hook_pattern anyway
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    wrapper = None
    if backend == "nnsight":
        import nnsight

        wrapper = nnsight.TransformersModel(path, task="text-generation", tokenizer=tokenizer, dispatch=True, **kwargs)
        model = wrapper._module
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    if backend == "transformer_lens":
        from transformer_lens.model_bridge import TransformerBridge

        wrapper = TransformerBridge.boot_transformers(
            path, hf_model=model, tokenizer=tokenizer, device=device, dtype=torch_dtype
        )
    return ModelHandle(
        model=model, tokenizer=tokenizer, source=str(source), path=path, backend=backend, wrapper=wrapper
    )
