"""Seeded training of the two model organisms, ``base`` and ``thinking`` (same architecture).

The base is trained on a mix of direct answers and free-standing worked notes (it knows *how* to
do the steps, not *when*); the thinking model is trained on ``<think>`` traces in the concise and
verbose styles with a curriculum over difficulty. (Fine-tuning the thinking model from a base
pretrained on ``{question} notes: ...`` documents was tried: within 3,600 base steps the base never
learned to read operands back from the question, 0.43-0.59 teacher-forced, so neither did the
fine-tuned thinking model; see issue 7.)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts import write_artifact
from . import task
from .tokenizer import ASSISTANT, EOS, THINK_END, THINK_START, USER, build_tokenizer, chat_template

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class OrganismArch:
    """Qwen2 shape of the organisms: grouped-query attention with 2 query heads per KV head."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 768


@dataclass
class TrainConfig:
    seed: int = 0
    base_steps: int = 400
    thinking_steps: int = 1800
    batch_size: int = 24
    lr: float = 1e-3
    warmup: int = 60
    direct_share: float = 0.6  # base corpus: share of direct question -> answer documents
    slip_rate: float = 0.08
    level1_steps: int = 400  # thinking curriculum: level 1 alone until retrieval is learned,
    unlock_every: int = 150  # then one more level every this many steps
    device: str = "auto"
    log_every: int = 100


def base_document(rng: random.Random, p: task.Problem, direct_share: float) -> tuple[str, int]:
    """A base pretraining document and the character offset where its loss starts (0: all)."""
    if rng.random() < direct_share:
        return f"{USER}{p.question}{ASSISTANT}{p.answer}{EOS}", 0
    return f"{task.worked_notes(p, rng)}{EOS}", 0


def thinking_document(rng: random.Random, p: task.Problem, slip_rate: float) -> tuple[str, int]:
    style = "verbose" if rng.random() < 0.5 else "concise"
    thought = task.think(p, rng, style, slip_rate)
    prompt = f"{USER}{p.question}{ASSISTANT}"
    return f"{prompt}{THINK_START}{thought.text}{THINK_END}{p.answer}{EOS}", len(prompt)


def curriculum_top(step: int, cfg: TrainConfig) -> int:
    """How many difficulty levels the thinking phase samples from at ``step``."""
    if step < cfg.level1_steps:
        return 1
    return min(len(task.LEVELS), 2 + (step - cfg.level1_steps) // cfg.unlock_every)


def make_model(vocab_size: int, arch: OrganismArch, pad_id: int, eos_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        **asdict(arch),
    )
    cfg.head_dim = arch.hidden_size // arch.num_attention_heads  # written to config.json, as Qwen ships it
    return Qwen2ForCausalLM(cfg)


def _batch(tok, docs: list[tuple[str, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = tok(
        [d for d, _ in docs], padding=True, return_offsets_mapping=True, padding_side="right", return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.clone()
    labels[mask == 0] = -100
    starts = torch.tensor([s for _, s in docs])[:, None]
    labels[enc["offset_mapping"][..., 0] < starts] = -100
    return ids.to(device), mask.to(device), labels.to(device)


def _train(
    model, tok, make_doc, steps: int, cfg: TrainConfig, rng: random.Random, device, tag: str, log, curriculum: bool
):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    t0, running = time.time(), 0.0
    levels = tuple(task.LEVELS)
    for step in range(steps):
        level = rng.choice(levels[: curriculum_top(step, cfg) if curriculum else len(levels)])
        docs = [make_doc(rng, task.sample_problem(rng, level)) for _ in range(cfg.batch_size)]
        ids, mask, labels = _batch(tok, docs, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            log(f"{tag}: step {step + 1}/{steps} loss {running / cfg.log_every:.4f} {time.time() - t0:.0f}s")
            running = 0.0
    model.eval()
    return model


ORGANISM_FORMAT = 1


def save_organism(model, tok, out_dir: Path, kind: str, cfg: TrainConfig) -> None:
    """Write weights + tokenizer as an ``organism`` artifact (atomic; every file hashed in ``manifest.json``)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.chat_template = chat_template(thinking=kind == "thinking")
        tok.save_pretrained(tmp)

    config = {
        "kind": kind,
        "train_config": asdict(cfg),
        "task_levels": {str(k): list(v) for k, v in task.LEVELS.items()},
    }
    write_artifact(out_dir, "organism", ORGANISM_FORMAT, config, {}, write, replace=True)


def train_organisms(
    cfg: TrainConfig = TrainConfig(),
    out_dir: Path = WEIGHTS_DIR,
    log=print,
    phases: tuple[str, ...] = ("base", "thinking"),
) -> dict[str, Path]:
    """Train the organisms named in ``phases``; returns their saved directories.

    Each phase is seeded on its own (``seed`` for base, ``seed + 1`` for thinking), so a phase
    re-run alone gives the same weights as in a full run.
    """
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    tok = build_tokenizer(thinking=True)
    docs = {
        "base": lambda r, p: base_document(r, p, cfg.direct_share),
        "thinking": lambda r, p: thinking_document(r, p, cfg.slip_rate),
    }
    steps = {"base": cfg.base_steps, "thinking": cfg.thinking_steps}
    out = {}
    for i, kind in enumerate(("base", "thinking")):
        if kind not in phases:
            continue
        torch.manual_seed(cfg.seed + i)
        rng = random.Random(cfg.seed + i)
        model = make_model(len(tok), OrganismArch(), tok.pad_token_id, tok.eos_token_id).to(device)
        log(f"organism {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
        _train(model, tok, docs[kind], steps[kind], cfg, rng, device, kind, log, curriculum=kind == "thinking")
        out[kind] = out_dir / kind
        save_organism(model, tok, out[kind], kind, cfg)
    return out
