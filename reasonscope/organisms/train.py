"""Seeded training of the two model organisms, ``base`` and ``thinking`` (same architecture).

Like a real base -> reasoning pair, the thinking organism is the base organism post-trained:

- **base** is pretrained on worked notes that read every operand back from the question and check each
  step, as plain text ``{question} notes: {worked notes} answer:{a}`` and (30%) as the continuation of a
  chat turn's ``<think>``, with a curriculum over difficulty (it learns *how* to reason, in both formats), then on a
  mix that adds direct chat answers ``<|user|>q<|assistant|>a`` (in the chat format it answers at once),
  free-standing notes, and ``<think>`` closed at once. It never learns to emit ``<think>``, and after one
  it closes it at once by default, though it can think there;
- **thinking** starts from the base weights and is fine-tuned on ``<think>`` traces in the concise
  and verbose styles (whose re-check is checked too), with slips that each step's check catches and corrects:
  first at slip rate 0.3 (where catching a slip is learned), then at 0.08, then a polish at 0.08 from a fresh
  optimiser (it learns *when* to reason).

Read-back forms during the notes-only phase; with direct answers mixed in from the start it did not
form within 3,600 steps (issue 7's measurements), hence the two base phases.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts import ArtifactError, read_manifest, write_artifact
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
    max_position_embeddings: int = 1152


@dataclass
class TrainConfig:
    seed: int = 1
    base_steps: int = 1800  # base, phase 1: question + notes documents, with the curriculum
    base_mix_steps: int = 500  # base, phase 2: notes, direct chat answers, free notes, <think> closed at once
    thinking_steps: int = 2000  # post-training from the base at check_slip_rate, with the curriculum
    settle_steps: int = 300  # then at slip_rate, all levels at once (the slip rate it imitates; detection stays)
    polish_steps: int = 1500  # then more of the same from a fresh optimiser: sharper reads, fewer unseen slips
    check_slip_rate: float = 0.3  # slip detection is learned at 0.3; at 0.08 barely in 1,100 steps (stop 30)
    batch_size: int = 24
    lr: float = 1e-3
    mix_lr: float = 3e-4
    finetune_lr: float = 5e-4
    warmup: int = 60
    think_pretrain_share: float = 0.3  # base phase 1: the notes continue a chat turn's ``<think>`` instead
    direct_share: float = 0.3  # base phase 2: direct chat answers
    empty_think_share: float = 0.25  # base phase 2: ``<think>`` closed at once (by default it does not think)
    think_notes_share: float = 0.05  # base phase 2: ``<think>`` notes and the answer, rarely
    free_notes_share: float = 0.1  # base phase 2: notes without a question (the rest: question + notes)
    slip_rate: float = 0.08
    level1_steps: int = 400  # base curriculum: level 1 alone until read-back is learned,
    unlock_every: int = 150  # then one more level every this many steps
    device: str = "auto"
    log_every: int = 100


def notes_document(rng: random.Random, p: task.Problem, slip_rate: float) -> tuple[str, int]:
    """``{question} notes: {notes} answer:{a}``; the loss starts at the notes (the question is random). The notes'
    steps check themselves; a verbose re-check is plain (checking it too is post-training's)."""
    style = "verbose" if rng.random() < 0.5 else "concise"
    thought = task.think(p, rng, style, slip_rate, checked_recheck=False)
    return f"{p.question} notes: {thought.text} answer:{p.answer}{EOS}", len(p.question)


def chat_turn(p: task.Problem) -> str:
    """The chat prompt of ``p`` as both organisms read it: ``<|user|>q<|assistant|>``."""
    return f"{USER}{p.question}{ASSISTANT}"


def pretraining_document(rng: random.Random, p: task.Problem, cfg: TrainConfig) -> tuple[str, int]:
    """Base phase 1: worked notes after the plain question, or after a chat turn's ``<think>`` (not a target)."""
    if rng.random() < cfg.think_pretrain_share:
        return opened_notes_document(rng, p, cfg.slip_rate)
    return notes_document(rng, p, cfg.slip_rate)


def opened_notes_document(rng: random.Random, p: task.Problem, slip_rate: float) -> tuple[str, int]:
    """A thinking trace whose loss starts after ``<think>``: the base learns to continue it, never to open it."""
    doc, _ = thinking_document(rng, p, slip_rate, checked_recheck=False)
    return doc, len(chat_turn(p) + THINK_START)


def mixed_base_document(rng: random.Random, p: task.Problem, cfg: TrainConfig) -> tuple[str, int]:
    """Base phase 2: a direct chat answer, free-standing notes, question + notes, or a chat turn continued after
    ``<think>`` (which the base never learns to emit): mostly closed at once, sometimes worked notes and the answer.

    After an empty ``<think></think>`` only the ``</think>`` is learned, so the base learns the answer after
    ``</think>`` from worked notes alone: it knows how to think in that format and how to conclude, but by default
    does not think (the *when* that post-training adds)."""
    r = rng.random()
    if r < cfg.direct_share:
        return f"{chat_turn(p)}{p.answer}{EOS}", 0
    r -= cfg.direct_share
    opened = chat_turn(p) + THINK_START
    if r < cfg.empty_think_share:
        return f"{opened}{THINK_END}", len(opened)
    r -= cfg.empty_think_share
    if r < cfg.think_notes_share:
        return opened_notes_document(rng, p, cfg.slip_rate)
    r -= cfg.think_notes_share
    if r < cfg.free_notes_share:
        return f"{task.worked_notes(p, rng)}{EOS}", 0
    return notes_document(rng, p, cfg.slip_rate)


def thinking_document(
    rng: random.Random, p: task.Problem, slip_rate: float, checked_recheck: bool = True
) -> tuple[str, int]:
    """``<|user|>q<|assistant|><think>{thinking}</think>{a}``; the loss starts at ``<think>``."""
    style = "verbose" if rng.random() < 0.5 else "concise"
    thought = task.think(p, rng, style, slip_rate, checked_recheck=checked_recheck)
    prompt = chat_turn(p)
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
    model,
    tok,
    make_doc,
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
        tok.backend_tokenizer.no_padding()  # training batches padded right; the shipped tokenizer carries no padding
        tok.save_pretrained(tmp)

    config = {
        "kind": kind,
        "init": "base" if kind == "thinking" else "random",
        "train_config": asdict(cfg),
        "task_levels": {str(k): list(v) for k, v in task.LEVELS.items()},
    }
    if out_dir.exists():  # replace an organism, never anything else
        try:
            read_manifest(out_dir, "organism")  # any format: an older organism is replaced too
        except (ArtifactError, OSError) as e:
            raise ArtifactError(f"{out_dir} exists and is not an organism ({e}); choose another --out") from None
    write_artifact(out_dir, "organism", ORGANISM_FORMAT, config, {}, write, replace=True)


def train_organisms(
    cfg: TrainConfig = TrainConfig(),
    out_dir: Path = WEIGHTS_DIR,
    log=print,
    phases: tuple[str, ...] = ("base", "thinking"),
) -> dict[str, Path]:
    """Train the organisms named in ``phases``; returns their saved directories.

    The thinking phase starts from the base weights: the ones just trained or, run alone, those in
    ``out_dir / "base"``. Each phase is seeded on its own (``seed`` for base, ``seed + 1`` for
    thinking), so a phase re-run alone gives the same weights as in a full run.
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
        rng = random.Random(cfg.seed)
        model = make_model(len(tok), OrganismArch(), tok.pad_token_id, tok.eos_token_id).to(device)
        log(f"organism base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
        notes = lambda r, p: pretraining_document(r, p, cfg)  # noqa: E731
        _train(model, tok, notes, cfg.base_steps, cfg, rng, device, "base", log, curriculum=True, lr=cfg.lr)
        mixed = lambda r, p: mixed_base_document(r, p, cfg)  # noqa: E731
        _train(model, tok, mixed, cfg.base_mix_steps, cfg, rng, device, "base mix", log, False, cfg.mix_lr)
        out["base"] = out_dir / "base"
        save_organism(model, tok, out["base"], "base", cfg)
    if "thinking" in phases:
        if model is None:
            from transformers import Qwen2ForCausalLM

            base_dir = out_dir / "base"
            if not (base_dir / "config.json").exists():
                raise FileNotFoundError(
                    f"{base_dir} has no base organism to post-train; train it first "
                    f"(`reasonscope organism train --only base --out {out_dir}`)"
                )
            model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)  # type: ignore[arg-type]
            model.config.max_position_embeddings = OrganismArch().max_position_embeddings  # RoPE: no weights change
        torch.manual_seed(cfg.seed + 1)
        rng = random.Random(cfg.seed + 1)
        checking = lambda r, p: thinking_document(r, p, cfg.check_slip_rate)  # noqa: E731
        log(f"organism thinking: post-training the base on {device}")
        _train(model, tok, checking, cfg.thinking_steps, cfg, rng, device, "thinking", log, True, cfg.finetune_lr)
        settle = lambda r, p: thinking_document(r, p, cfg.slip_rate)  # noqa: E731
        _train(model, tok, settle, cfg.settle_steps, cfg, rng, device, "thinking settle", log, False, cfg.finetune_lr)
        if cfg.polish_steps:
            torch.manual_seed(cfg.seed + 2)
            rng = random.Random(cfg.seed + 2)
            tag, lr = "thinking polish", cfg.finetune_lr
            _train(model, tok, settle, cfg.polish_steps, cfg, rng, device, tag, log, False, lr)
        out["thinking"] = out_dir / "thinking"
        save_organism(model, tok, out["thinking"], "thinking", cfg)
    return out
