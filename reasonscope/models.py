"""``load_model``: one handle over a local HF directory, a hub id or a model organism.

Three backends share the hook naming of :mod:`reasonscope.hooks`:

- ``"hf"`` (default): the plain ``transformers`` model with PyTorch hooks;
- ``"transformer_lens"``: ``TransformerBridge.boot_transformers`` (eager attention);
- ``"nnsight"``: ``nnsight.LanguageModel(..., dispatch=True)``.

``handle.run(input_ids, attention_mask, hooks={name: fn})`` runs a forward pass through the
chosen backend, calling ``fn(activation)`` at each named hook point (a returned tensor replaces
the activation), and gives the logits.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch

from .hooks import HookFn, attach, get_module, hook_names, parse_hook

BACKENDS = ("hf", "transformer_lens", "nnsight")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ORGANISM_DIR = Path(__file__).parent / "organisms" / "weights"
ORGANISMS = ("thinking", "base")
THINK_MARKERS = ("<think>", "</think>")


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
    def from_config(cls, cfg) -> "Geometry":
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
    backend: str = "hf"
    wrapper: Any = None  # TransformerBridge or nnsight.LanguageModel, when that backend is chosen
    meta: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_config(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def think_start(self) -> str:
        return THINK_MARKERS[0]

    @property
    def think_end(self) -> str:
        return THINK_MARKERS[1]

    @cached_property
    def think_ids(self) -> tuple[int | None, int | None]:
        """Token ids of ``<think>``/``</think>`` (None where the vocabulary lacks one)."""
        vocab = self.tokenizer.get_vocab()
        return tuple(vocab.get(m) for m in THINK_MARKERS)  # type: ignore[return-value]

    @property
    def hook_names(self) -> list[str]:
        return hook_names(self.geometry.n_layers)

    @cached_property
    def weight_hash(self) -> str:
        from .store import weight_hash

        return weight_hash(self.model)

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

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hooks: Mapping[str, HookFn] | None = None,
    ) -> torch.Tensor:
        """Forward pass through the backend with ``hooks``; returns logits ``[batch, pos, vocab]``.

        Position ids follow the attention mask, so left-padded rows equal their unpadded selves.
        """
        hooks = dict(hooks or {})
        g = self.geometry
        for name in hooks:
            parse_hook(name, g.n_layers)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.backend == "hf":
            with attach(self.model, hooks, g.n_layers, g.n_heads):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        if self.backend == "transformer_lens":
            fwd = [(name, _tl_hook(fn)) for name, fn in hooks.items()]
            return self.wrapper.run_with_hooks(input_ids, attention_mask=attention_mask, fwd_hooks=fwd)
        return self._run_nnsight(input_ids, attention_mask, position_ids, hooks)

    def _run_nnsight(self, input_ids, attention_mask, position_ids, hooks: dict[str, HookFn]) -> torch.Tensor:
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
                canon = value.unflatten(-1, (g.n_heads, -1)) if p.spec.module.endswith("o_proj") else value
                new = hooks[p.name](canon)
                if new is not None:
                    new = new.flatten(-2) if p.spec.module.endswith("o_proj") else new
                    if p.spec.side == "input":
                        env.input = new
                    elif isinstance(env.output, tuple):
                        env.output = (*env.output[: p.spec.tuple_index], new, *env.output[p.spec.tuple_index + 1 :])
                    else:
                        env.output = new
            logits = lm.output.logits.save()
        return logits


def _tl_hook(fn: HookFn):
    def hook(tensor, hook):  # TransformerLens passes (activation, hook point)
        return fn(tensor)

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
            raise ModelNotFoundError(f"organism weights missing at {path}; run `reasonscope organism train`")
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
        tried.append("hub: unreachable (offline); download the model on a connected machine and pass its local directory")
    tried.append(f"organisms: use one of {['organism:' + o for o in ORGANISMS]}")
    raise ModelNotFoundError(f"cannot load model {source!r}. Tried:\n  - " + "\n  - ".join(tried))


def load_model(
    source: str | os.PathLike,
    backend: str = "hf",
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
) -> ModelHandle:
    """Load a causal LM from a local HF directory, a hub id or ``organism:thinking|base``.

    ``device="auto"`` picks CUDA when present. ``device_map="auto"`` is passed through to
    ``from_pretrained`` for models larger than one GPU (then ``device`` is ignored).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_source(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

        wrapper = nnsight.LanguageModel(path, tokenizer=tokenizer, dispatch=True, **kwargs)
        model = wrapper._module
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    if backend == "transformer_lens":
        from transformer_lens.model_bridge import TransformerBridge

        wrapper = TransformerBridge.boot_transformers(path, hf_model=model, tokenizer=tokenizer, device=device,
                                                      dtype=torch_dtype)
    return ModelHandle(model=model, tokenizer=tokenizer, source=str(source), path=path, backend=backend,
                       wrapper=wrapper)
