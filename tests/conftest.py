"""Shared fixtures: tiny random Qwen2 (GQA) model directories (organism and R1 tokenizers) and organism traces.

Tests on ``../shared/data`` or on the shipped organism weights skip when those are missing, except
in CI (``CI=true``) or with ``REASONSCOPE_REQUIRE_SHARED=1``, where they fail instead.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ORGANISMS_READY = (Path(__file__).resolve().parents[1] / "reasonscope/organisms/weights/thinking/config.json").exists()
F = TypeVar("F", bound=Callable[..., object])


def required() -> bool:
    """Whether missing shared data or organism weights fail tests (CI) rather than skip them."""
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return ci or os.environ.get("REASONSCOPE_REQUIRE_SHARED", "") == "1"


def shared_data(rel: str) -> Path:
    """``../shared/data/<rel>``; skips the test when it is missing, or fails it in CI."""
    path = SHARED / rel
    if not path.exists():
        msg = f"real data not found at {path} (expected the shared data next to the repo)"
        if required():
            pytest.fail(msg + "; CI requires it (CI / REASONSCOPE_REQUIRE_SHARED)")
        pytest.skip(msg)
    return path


def organisms(fn: F) -> F:
    """Marks an end-to-end test on the shipped organisms: ``slow``; skipped (failed in CI) without weights."""
    ready = ORGANISMS_READY or required()
    return pytest.mark.slow(pytest.mark.skipif(not ready, reason="organism weights not trained")(fn))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def save_tiny_model(tok, path: Path, seed: int, max_positions: int = 512, block_std: float | None = None) -> Path:
    """A 2-layer Qwen2 (32 wide, 4 query / 2 KV heads) for ``tok``, saved with it like a hub model at ``path``;
    ``block_std`` redraws the block weights that large (a model whose greedy token is not just its input's)."""
    from reasonscope.organisms.train import OrganismArch, make_model

    torch.manual_seed(seed)
    arch = OrganismArch(
        hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=max_positions
    )
    model = make_model(len(tok), arch, tok.pad_token_id, tok.eos_token_id)
    if block_std is not None:
        with torch.no_grad():
            for p in model.model.layers.parameters():
                if p.ndim == 2:
                    p.normal_(0, block_std)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the organism tokenizer."""
    from reasonscope.organisms.tokenizer import build_tokenizer

    return save_tiny_model(build_tokenizer(), tmp_path_factory.mktemp("tiny") / "tiny-qwen2", seed=0)


R1_TEMPLATE = (  # the R1-distill chat format, reduced to what generation needs: a user turn, then <think>
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def _r1_tokenizer():
    from reasonscope.traces import qwen2_tokenizer

    tok = qwen2_tokenizer(shared_data("tokenizers/qwen2"))
    tok.chat_template = R1_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def r1_tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the real R1-distill tokenizer (151,665 tokens) and its chat format: real-model
    paths (multi-token ``<think>``, the GSM8K grader, a 150k vocabulary) at tiny-model cost."""
    return save_tiny_model(_r1_tokenizer(), tmp_path_factory.mktemp("r1-tiny") / "r1-tiny", 0, max_positions=2048)


@pytest.fixture(scope="session")
def r1_other_dir(tmp_path_factory) -> Path:
    """A second R1-format tiny model: the same tokenizer, other (larger) block weights."""
    path = tmp_path_factory.mktemp("r1-other") / "r1-other"
    return save_tiny_model(_r1_tokenizer(), path, 1, max_positions=2048, block_std=0.3)


@pytest.fixture(scope="session")
def tiny_handle(tiny_model_dir):
    from reasonscope.models import load_model

    return load_model(tiny_model_dir)


def varied_model(path, attn: str = "sdpa", seed: int = 0):
    """The tiny model with weights of std 0.3 (seeded): its greedy text varies, unlike the fixture's tied-embedding
    init, which repeats the last prompt token (so equal outputs would prove little)."""
    from reasonscope.models import load_model

    h = load_model(path, attn_implementation=attn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in h.model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return h


def make_task_traces(tokenizer, n: int, seed: int = 0):
    """Segmented organism-task traces (prompt, thinking, answer) of varied lengths, no model needed."""
    from reasonscope.organisms import task
    from reasonscope.organisms.tokenizer import ASSISTANT, THINK_START, USER
    from reasonscope.traces.record import Trace
    from reasonscope.traces.segment import segment_trace

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = task.sample_problem(rng, 1 + i % 3)
        th = task.think(p, rng, "concise" if i % 2 else "verbose")
        t = Trace(
            id=f"t{i}",
            prompt=f"{USER} {p.question} {ASSISTANT} {THINK_START}",
            thinking=th.text,
            answer=str(p.answer),
            gold=str(p.answer),
            source="test",
        )
        out.append(segment_trace(t, tokenizer, min_chars=0))
    return out


@pytest.fixture(scope="session")
def task_traces(tiny_handle):
    return make_task_traces(tiny_handle.tokenizer, 12)


def grad_modes(model, monkeypatch) -> list[bool]:
    """A list that records, for each forward call of ``model`` from now on, whether inference_mode was on."""
    modes: list[bool] = []
    forward = model.forward

    def spy(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return modes


def torch_hooks(model) -> set[tuple[str, int]]:
    """(module, hook id) of every forward and pre-forward hook on ``model``.

    Compare before and after: transformers itself keeps hooks on a model once ``output_hidden_states`` or
    ``output_attentions`` has been asked for, so "no hooks at all" is not a property of a clean model.
    """
    return {
        (name, hid)
        for name, m in model.named_modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for hid in hooks
    }
