"""What the benchmarks share: the random-init 1.5B shape of the GPU benchmarks (the real
DeepSeek-R1-Distill-Qwen-1.5B / Qwen2-1.5B config and tokenizer from ../shared/data/tokenizers/qwen2) and the
argument types that refuse a count that would silently run another workload."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

QWEN2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "qwen2"


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"{text} is not an integer >= {low}")
        return n

    return parse


count, count0 = at_least(1), at_least(0)  # repeats, problems, layers, batch sizes; 0: skip that part


def random_qwen2(layers: int | None = None, device: str | None = None):  # -> reasonscope.models.ModelHandle
    """A random-init model of that shape (seed 0; bf16 on CUDA, float32 on CPU) with the real tokenizer;
    ``layers`` keeps only the first layers (a quick check of a path on CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from reasonscope.models import ModelHandle
    from reasonscope.traces.loaders import qwen2_tokenizer

    cfg = AutoConfig.from_pretrained(QWEN2)
    if layers is not None:
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise ValueError(f"layers={layers}: the 1.5B shape has 1..{cfg.num_hidden_layers}")
        cfg.num_hidden_layers, cfg.layer_types = layers, cfg.layer_types[:layers]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return ModelHandle(model=model, tokenizer=qwen2_tokenizer(QWEN2), source="random:qwen2-1.5b", path=str(QWEN2))
