"""Seeded training of the two model organisms, ``base`` and ``thinking`` (same architecture).

Like a real base -> reasoning pair, the thinking organism is the base organism post-trained:

- **base** is pretrained on plain-text documents ``{question} notes: {worked notes} answer:{a}``
  whose notes read every operand back from the question (it knows *how* to reason), beside direct
  chat answers ``<|user|>q<|assistant|>a`` (in the chat format it answers at once) and free-standing
  notes; a curriculum over difficulty lets it learn read-back on short chains first;
- **thinking** starts from the base weights and is fine-tuned on ``<think>`` traces in the concise
  and verbose styles, with slips that are caught and corrected (it learns *when* to reason).
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
    base_steps: int = 3600
    thinking_steps: int = 400
    batch_size: int = 24
    lr: float = 1e-3  # base pretraining
    finetune_lr: float = 5e-4  # thinking post-training, from the base weights
    warmup: int = 60
    direct_share: float = 0.1  # base corpus: direct chat answers
    notes_share: float = 0.85  # base corpus: question + worked notes (the rest: free-standing scratch work)
    slip_rate: float = 0.08
    level1_steps: int = 600  # base curriculum: level 1 alone until read-back is learned,
    unlock_every: int = 200  # then one more level every this many steps
    device: str = "auto"
    log_every: int = 100


BASE_KINDS = ("direct", "notes", "scratch")


def base_document(rng: random.Random, p: task.Problem, cfg: TrainConfig, kind: str, style: str) -> tuple[str, int]:
    """A base pretraining document of ``kind`` and the character offset where its loss starts (0: all)."""
    if kind == "direct":
        return f"{USER}{p.question}{ASSISTANT}{p.answer}{EOS}", 0
    if kind == "notes":  # the loss starts at the notes: the question's random values carry no signal
        doc = task.notes_document(p, rng, cfg.slip_rate, style)
        return f"{doc}{EOS}", len(task.notes_prompt(p)) - len(" notes:")
    return f"{task.worked_notes(p, rng)}{EOS}", 0


def base_batch(rng: random.Random, level: int, cfg: TrainConfig) -> list[tuple[str, int]]:
    """One kind (and style) of base document per batch, so batches pad to similar lengths."""
    weights = (cfg.direct_share, cfg.notes_share, 1 - cfg.direct_share - cfg.notes_share)
    kind = rng.choices(BASE_KINDS, weights)[0]
    style = rng.choice(task.STYLES)
    return [base_document(rng, task.sample_problem(rng, level), cfg, kind, style) for _ in range(cfg.batch_size)]


def thinking_document(rng: random.Random, p: task.Problem, slip_rate: float) -> tuple[str, int]:
    style = "verbose" if rng.random() < 0.5 else "concise"
    thought = task.think(p, rng, style, slip_rate)
    prompt = f"{USER}{p.question}{ASSISTANT}"
    return f"{prompt}{THINK_START}{thought.text}{THINK_END}{p.answer}{EOS}", len(prompt)


def thinking_batch(rng: random.Random, level: int, cfg: TrainConfig) -> list[tuple[str, int]]:
    return [thinking_document(rng, task.sample_problem(rng, level), cfg.slip_rate) for _ in range(cfg.batch_size)]


@torch.no_grad()
def readback_accuracy(model, tok, device, n: int = 32, level: int = 2, seed: int = 12345) -> float:
    """Teacher-forced share of operand values (the ``7`` of ``c7;`` in the notes) predicted right.

    The value is only in the question, far back: this measures whether read-back has been learned.
    """
    import re

    rng = random.Random(seed)
    docs = [task.notes_document(task.sample_problem(rng, level), rng, 0.0, "concise") for _ in range(n)]
    enc = tok(docs, padding=True, return_offsets_mapping=True, padding_side="right", return_tensors="pt")
    was_training = model.training
    model.eval()
    pred = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
    model.train(was_training)
    pred = pred.argmax(-1).cpu()
    hits = total = 0
    for row, doc in enumerate(docs):
        start = doc.index(" notes:")
        starts = enc["offset_mapping"][row, :, 0].tolist()
        for m in re.finditer(r"\b[a-p](\d);", doc[start:]):
            pos = starts.index(start + m.start(1))  # the value digit is its own token
            hits += int(pred[row, pos - 1] == enc["input_ids"][row, pos])
            total += 1
    return hits / max(total, 1)


def curriculum_top(step: int, cfg: TrainConfig) -> int:
    """How many difficulty levels base pretraining samples from at ``step``."""
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
    model,
    tok,
    make_batch,
    steps: int,
    cfg: TrainConfig,
    rng: random.Random,
    device,
    tag: str,
    log,
    curriculum: bool,
    lr: float,
):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    t0, running = time.time(), 0.0
    levels = tuple(task.LEVELS)
    for step in range(steps):
        level = rng.choice(levels[: curriculum_top(step, cfg) if curriculum else len(levels)])
        ids, mask, labels = _batch(tok, make_batch(rng, level, cfg), device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            acc = readback_accuracy(model, tok, device)
            log(
                f"{tag}: step {step + 1}/{steps} loss {running / cfg.log_every:.4f} "
                f"read-back {acc:.3f} {time.time() - t0:.0f}s"
            )
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
        "init": "base" if kind == "thinking" else "random",
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

    The thinking phase starts from the base weights: from the ones just trained, or, when run
    alone, from ``out_dir / "base"``. Each phase is seeded on its own (``seed`` for base,
    ``seed + 1`` for thinking), so a phase re-run alone gives the same weights as in a full run.
    """
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    tok = build_tokenizer(thinking=True)
    out: dict[str, Path] = {}
    model = None
    if "base" in phases:
        torch.manual_seed(cfg.seed)
        model = make_model(len(tok), OrganismArch(), tok.pad_token_id, tok.eos_token_id).to(device)
        log(f"organism base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
        _train(
            model,
            tok,
            base_batch,
            cfg.base_steps,
            cfg,
            random.Random(cfg.seed),
            device,
            "base",
            log,
            curriculum=True,
            lr=cfg.lr,
        )
        out["base"] = out_dir / "base"
        save_organism(model, tok, out["base"], "base", cfg)
    if "thinking" in phases:
        if model is None:
            from transformers import Qwen2ForCausalLM

            base_dir = out_dir / "base"
            if not (base_dir / "config.json").exists():
                raise FileNotFoundError(
                    f"{base_dir} has no base organism to fine-tune; train it first "
                    "(`reasonscope organism train --only base`)"
                )
            model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)  # type: ignore[arg-type]
        torch.manual_seed(cfg.seed + 1)
        log(f"organism thinking: fine-tuning the base on {device}")
        _train(
            model,
            tok,
            thinking_batch,
            cfg.thinking_steps,
            cfg,
            random.Random(cfg.seed + 1),
            device,
            "thinking",
            log,
            curriculum=False,
            lr=cfg.finetune_lr,
        )
        out["thinking"] = out_dir / "thinking"
        save_organism(model, tok, out["thinking"], "thinking", cfg)
    return out
