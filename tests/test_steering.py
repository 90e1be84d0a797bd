"""SteeringVector: applying through hooks (positions, per-request γ, backends, cleanup), extraction, the artifact."""

from __future__ import annotations

import pytest
import torch

from reasonscope.artifacts import CorruptFileError, verify_artifact
from reasonscope.generation import DecodeConfig, generate
from reasonscope.models import load_model
from steering.extract import (
    behaviour_vectors,
    extract_vector,
    mean_difference,
    pca_difference,
    residuals,
    segment_residuals,
)
from steering.vector import SteeringVector, VectorMeta

from conftest import grad_modes, torch_hooks

TEXTS = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?"]  # row 2 is left-padded


def batch(h, texts=TEXTS):
    enc = h.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def make_vector(h, layers=(1,), positions="all", seed=0, **meta) -> SteeringVector:
    g = h.geometry
    torch.manual_seed(seed)
    m = VectorMeta(d_model=g.d_model, layers=layers, positions=positions, n_layers=g.n_layers, **meta)
    return SteeringVector(torch.randn(len(layers), g.d_model), m)


def resid(h, layer, ids, mask):
    seen = {}
    with torch.no_grad():
        logits = h.run(ids, mask, hooks={f"blocks.{layer}.hook_resid_post": lambda x: seen.setdefault("x", x.clone())})
    return seen["x"].cpu(), logits.cpu()


@pytest.mark.parametrize("positions", ["all", "last"])
def test_apply_adds_gamma_v_at_the_named_layer_and_positions(tiny_handle, positions):
    h = tiny_handle
    vec = make_vector(h, positions=positions)
    ids, mask = batch(h)
    before, _ = resid(h, 1, ids, mask)
    with vec.apply(h, gamma=0.5):
        after, _ = resid(h, 1, ids, mask)  # a read hook registered after the steering hook sees the steered value
    expected = torch.zeros_like(before)
    if positions == "all":
        expected[:] = 0.5 * vec.direction(1)
    else:
        expected[:, -1] = 0.5 * vec.direction(1)
    assert torch.allclose(after - before, expected, atol=1e-5)
    layer0_before, _ = resid(h, 0, ids, mask)
    with vec.apply(h, gamma=0.5):
        layer0_after, _ = resid(h, 0, ids, mask)
    assert torch.equal(layer0_before, layer0_after)  # upstream of the steered block: untouched


def test_hooks_as_data_compose_with_other_hooks_in_one_pass(tiny_handle):
    """``vec.hooks(...)`` are the hooks ``apply`` attaches: merged with a reader in one ``run`` they steer alike."""
    h = tiny_handle
    vec = make_vector(h, layers=(0, 1), positions="last")
    ids, mask = batch(h)
    with vec.apply(h, gamma=[0.5, 2.0]):
        _, want_logits = resid(h, 1, ids, mask)
    seen = {}
    reader = {"blocks.1.attn.hook_z": lambda x: seen.setdefault("z", x.clone())}
    with torch.no_grad():
        logits = h.run(ids, mask, hooks={**vec.hooks(h, gamma=[0.5, 2.0]), **reader})
    assert torch.allclose(logits.cpu(), want_logits, atol=1e-5) and "z" in seen
    assert set(vec.hooks(h, layers=[1])) == {"blocks.1.hook_resid_post"}
    with pytest.raises(ValueError, match="positions"):
        vec.hooks(h, positions="middle")  # type: ignore[arg-type]


def test_per_row_gamma_in_a_forward_pass(tiny_handle):
    h = tiny_handle
    vec = make_vector(h)
    ids, mask = batch(h)
    _, ref = resid(h, 0, ids, mask)
    with vec.apply(h, gamma=[0.0, 3.0]):
        _, got = resid(h, 0, ids, mask)
    m = mask.bool()
    assert torch.allclose(got[0][m[0]], ref[0][m[0]], atol=1e-6)
    assert not torch.allclose(got[1][m[1]], ref[1][m[1]], atol=1e-3)
    with pytest.raises(ValueError, match="one per row"), vec.apply(h, gamma=[1.0, 2.0, 3.0]):
        h.run(ids, mask)


@pytest.mark.parametrize("positions", ["last", "generated", "all", "prompt"])
def test_per_request_gamma_during_generation(tiny_handle, positions):
    h = tiny_handle
    vec = make_vector(h, layers=(0, 1), positions=positions)
    prompts = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[1]]
    cfg = DecodeConfig(max_new_tokens=12, batch_size=3, refill=1)  # refills: rows serve changing requests
    plain = generate(h, prompts, cfg)
    gammas = [0.0, 0.0, 40.0, 40.0]
    with vec.apply(h, gamma=gammas):
        steered = generate(h, prompts, cfg)
    assert [c.token_ids for c in steered[:2]] == [c.token_ids for c in plain[:2]]
    assert all(s.token_ids != p.token_ids for s, p in zip(steered[2:], plain[2:]))
    again = generate(h, prompts, cfg)
    assert [c.token_ids for c in again] == [c.token_ids for c in plain]
    for wrong in ([0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]):  # too few, too many: one per request
        refused = pytest.raises(ValueError, match=f"{len(wrong)} gamma values for the 4 requests")
        with refused, vec.apply(h, gamma=wrong):
            generate(h, prompts, cfg)


@pytest.mark.parametrize("positions", ["last", "generated", "all", "prompt"])
def test_per_request_gamma_with_shared_prefixes(tiny_handle, positions):
    """A shared prefix runs once, in its root's pass: per-request strengths that differ there cannot all hold."""
    h = tiny_handle
    vec = make_vector(h, layers=(0, 1), positions=positions)
    stem = "given a3, b4, c1, d2, e5, f6, g7. what is "
    prompts = [stem + "a + b?", stem + "c + d - e?"]  # one group: its longest prompt is the root
    gammas = [0.0, 20.0]
    with vec.apply(h, gamma=gammas):
        alone = generate(h, prompts, DecodeConfig(max_new_tokens=8))
    with vec.apply(h, gamma=gammas):
        if positions == "all":  # the prefix's steered keys and values would be the root's γ for both
            with pytest.raises(ValueError, match="one gamma or set share_prefixes=False"):
                generate(h, prompts, DecodeConfig(max_new_tokens=8, share_prefixes=True))
            return
        shared = generate(h, prompts, DecodeConfig(max_new_tokens=8, share_prefixes=True))
    assert [c.token_ids for c in shared] == [c.token_ids for c in alone]
    with vec.apply(h, gamma=[20.0, 20.0]):  # one strength: sharing is exact for every rule
        assert [c.token_ids for c in generate(h, prompts, DecodeConfig(max_new_tokens=8, share_prefixes=True))] == [
            c.token_ids for c in generate(h, prompts, DecodeConfig(max_new_tokens=8))
        ]


def test_steered_generation_skips_autograd_and_the_vector_still_trains_afterwards(tiny_model_dir, monkeypatch):
    """Steering hooks keep no tensor, so a steered generation runs under inference_mode like a plain one; what the
    hooks cache there (the direction cast to bf16) stays usable in autograd in a later pass of the same apply."""
    h = load_model(tiny_model_dir, dtype=torch.bfloat16)
    vec = make_vector(h, layers=(0, 1), positions="last")
    modes = grad_modes(h.model, monkeypatch)
    cfg = DecodeConfig(max_new_tokens=6, batch_size=2)
    with vec.apply(h, gamma=[0.0, 30.0]):
        steered = generate(h, TEXTS, cfg)
        assert modes and all(modes)
        again = generate(h, TEXTS, cfg, on_token=lambda b, t, lg: None)  # a callback could keep tensors: no_grad
    assert not modes[-1] and [c.token_ids for c in again] == [c.token_ids for c in steered]
    ids, mask = batch(h)
    gamma = torch.tensor(2.0, requires_grad=True)
    with vec.apply(h, gamma=gamma):
        generate(h, TEXTS, cfg)  # the hooks cache the bf16 direction here, under inference_mode
        logits = h.run(ids, mask)
    logits.float().sum().backward()  # d logits / d gamma: autograd keeps that cached direction
    assert gamma.grad is not None and bool(torch.isfinite(gamma.grad))


STEERED_AT = {  # positions of prompt (n tokens) + generated tokens each rule steers during generation
    "all": lambda n, k: range(n + k),
    "last": lambda n, k: range(n - 1, n + k),  # the last position of every pass: prefill, then each fed token
    "generated": lambda n, k: range(n, n + k),  # decode steps only
    "prompt": lambda n, k: range(n - 1, n),  # the last prompt token of the prefill only
}


@pytest.mark.parametrize("positions", list(STEERED_AT))
def test_each_rule_steers_its_positions_during_generation(tiny_handle, positions):
    """Each step's logits equal a full re-run of prompt ⊕ tokens so far with γ·v at exactly the positions the rule
    names (steered keys stay in the cache)."""
    h = tiny_handle
    vec = make_vector(h, layers=(0, 1), positions=positions)
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(b, tokens, logits):
        for row, req in enumerate(b.rows.tolist()):
            if req >= 0:
                seen.setdefault(req, []).append(logits[row].float().clone())

    with vec.apply(h, gamma=3.0):
        steered = generate(h, TEXTS, DecodeConfig(max_new_tokens=6, batch_size=2), on_token=keep)
    for req, c in enumerate(steered):
        n = len(c.prompt_ids)
        assert len(seen[req]) == len(c.token_ids)
        for k, got in enumerate(seen[req]):
            at = list(STEERED_AT[positions](n, k))

            def add(x, layer, at=at):
                x = x.clone()
                x[:, at] += 3.0 * vec.direction(layer)
                return x

            hooks = {f"blocks.{i}.hook_resid_post": (lambda x, i=i: add(x, i)) for i in (0, 1)}
            with torch.no_grad():
                ref = h.run(torch.tensor([c.prompt_ids + c.token_ids[:k]]), hooks=hooks)[0, -1].float()
            assert torch.allclose(got, ref, atol=1e-4), (req, k)
        with torch.no_grad():
            plain = h.run(torch.tensor([c.prompt_ids]))[0, -1].float()
        first_steered = not torch.allclose(seen[req][0], plain, atol=1e-2)
        assert first_steered == (positions != "generated")  # ``generated`` leaves the prefill alone


def test_prompt_rule_outside_generation_is_the_last_position(tiny_handle):
    h = tiny_handle
    vec = make_vector(h, layers=(0, 1), positions="prompt")
    ids, mask = batch(h)
    with vec.apply(h, gamma=3.0):  # a plain forward pass: the last position, as ``last``
        before, _ = resid(h, 0, ids, mask)
    with vec.apply(h, gamma=3.0, positions="last"):
        after, _ = resid(h, 0, ids, mask)
    assert torch.equal(before, after)


def test_generated_rule_needs_the_generation_engine(tiny_handle):
    vec = make_vector(tiny_handle, positions="generated")
    ids, mask = batch(tiny_handle)
    with pytest.raises(ValueError, match="decode steps"), vec.apply(tiny_handle):
        tiny_handle.run(ids, mask)


def test_hooks_removed_when_generation_raises(tiny_handle):
    h = tiny_handle
    vec = make_vector(h)
    ids, mask = batch(h)
    _, before = resid(h, 0, ids, mask)
    hooks_before = torch_hooks(h.model)

    def boom(batch, tokens, logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), vec.apply(h, gamma=5.0):
        generate(h, TEXTS, DecodeConfig(max_new_tokens=4), on_token=boom)
    _, after = resid(h, 0, ids, mask)
    assert torch.equal(before, after)
    assert torch_hooks(h.model) == hooks_before


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_give_the_same_steered_logits(tiny_model_dir, tiny_handle, backend):
    vec = make_vector(tiny_handle, layers=(0, 1))
    ids, mask = batch(tiny_handle)
    m = mask.bool()
    with vec.apply(tiny_handle, gamma=0.7):
        ref = tiny_handle.run(ids, mask).detach()
    other = load_model(tiny_model_dir, backend=backend)
    plain = other.run(ids, mask).detach()
    with vec.apply(other, gamma=0.7):
        got = other.run(ids, mask).detach()
    assert torch.allclose(got[m], ref[m], atol=1e-4)
    assert not torch.allclose(plain[m], ref[m], atol=1e-3)


def test_refuses_another_model_bad_layers_and_nan(tiny_handle):
    hooks_before = torch_hooks(tiny_handle.model)
    g = tiny_handle.geometry
    wide = SteeringVector(torch.ones(1, g.d_model + 1), VectorMeta(d_model=g.d_model + 1, layers=(0,)))
    with pytest.raises(ValueError, match="width"), wide.apply(tiny_handle):
        pytest.fail("entering the context should have been refused")
    deep = SteeringVector(torch.ones(1, g.d_model), VectorMeta(d_model=g.d_model, layers=(0,), n_layers=g.n_layers + 2))
    with pytest.raises(ValueError, match="layers"), deep.apply(tiny_handle):
        pytest.fail("entering the context should have been refused")
    far = SteeringVector(torch.ones(1, g.d_model), VectorMeta(d_model=g.d_model, layers=(g.n_layers,)))
    with pytest.raises(ValueError, match="does not exist"), far.apply(tiny_handle):
        pytest.fail("entering the context should have been refused")
    with pytest.raises(ValueError, match="layer 1 holds NaN"):
        SteeringVector(torch.tensor([[0.0] * 4, [float("nan")] * 4]), VectorMeta(d_model=4, layers=(0, 1)))
    with pytest.raises(ValueError, match="shape"):
        SteeringVector(torch.ones(2, 4), VectorMeta(d_model=4, layers=(0,)))
    with pytest.raises(ValueError, match="positions"):
        VectorMeta(d_model=4, layers=(0,), positions="middle")  # type: ignore[arg-type]
    assert torch_hooks(tiny_handle.model) == hooks_before


def test_artifact_round_trip_and_damage(tiny_handle, tmp_path):
    vec = make_vector(tiny_handle, layers=(0, 1), positions="last", gamma=0.3, gamma_rule="sweep", recipe={"k": 1})
    vec.save(tmp_path / "v", report={"note": "x"})
    back = SteeringVector.open(tmp_path / "v")
    assert torch.equal(back.directions, vec.directions) and back.meta == vec.meta
    assert verify_artifact(tmp_path / "v").ok
    with pytest.raises(FileExistsError):
        vec.save(tmp_path / "v")
    blob = tmp_path / "v" / "directions.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        SteeringVector.open(tmp_path / "v")


def test_residuals_and_directions(tiny_handle):
    h = tiny_handle
    ids, mask = batch(h)
    full, _ = resid(h, 1, ids, mask)
    last = residuals(h, TEXTS, [1], "last")
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    mean = residuals(h, TEXTS, [1], "mean")
    m = mask.bool()
    assert torch.allclose(mean[1, 0], full[1][m[1]].mean(0), atol=1e-5)  # padding excluded
    assert residuals(h, TEXTS, [1], "all").shape[0] == int(mask.sum())
    tgt, src = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    assert torch.allclose(mean_difference(tgt, src), (tgt - src).mean(0), atol=1e-6)
    shift = torch.zeros(2, 8)
    shift[:, 3] = 5.0
    pc = pca_difference(src + shift + 0.01 * torch.randn(6, 2, 8) * torch.arange(6)[:, None, None], src)
    assert torch.allclose(pc.norm(dim=-1), torch.ones(2)) and bool((pc[:, 3] > 0.99).all())
    assert bool((pca_difference(src, src + shift)[:, 3] < -0.99).all())  # sign follows target - source
    with pytest.raises(ValueError, match="does not exist"):
        residuals(h, TEXTS, [9])


def test_extract_vector_records_provenance(tiny_handle):
    vec = extract_vector(tiny_handle, TEXTS[:1], TEXTS[1:], [0, 1], reduce="mean", positions="last")
    assert vec.meta.model_hash == tiny_handle.weight_hash and vec.meta.n_layers == tiny_handle.geometry.n_layers
    assert vec.meta.recipe["method"] == "mean_diff" and vec.meta.recipe["model_type"] == "qwen2"
    with pytest.raises(ValueError, match="pca needs paired"):
        extract_vector(tiny_handle, TEXTS, TEXTS[:1], [0], method="pca")


def test_segment_means_and_behaviour_vectors(tiny_handle, task_traces):
    h = tiny_handle
    acts, owners = segment_residuals(h, task_traces, [1], batch_size=5)
    i, k = owners[7]
    t = task_traces[i]
    ids = torch.tensor([t.token_ids])
    full, _ = resid(h, 1, ids, torch.ones_like(ids))
    seg = t.segments[k]
    assert torch.allclose(acts[7, 0], full[0, seg.start : seg.end].mean(0), atol=1e-5)

    def label(s):
        return "check" if "let me" in s.text or "wait" in s.text else "step"

    vecs = behaviour_vectors(h, task_traces, [0, 1], label)
    assert sorted(vecs) == ["check", "step"] and vecs["check"].meta.recipe["behaviour"] == "check"
    names = [label(task_traces[a].segments[b]) for a, b in owners]
    mine = acts[[n == "check" for n in names]]
    assert torch.allclose(vecs["check"].direction(1), mine[:, 0].mean(0) - acts[:, 0].mean(0), atol=1e-5)


def test_a_tensor_gamma_is_read_at_every_pass_and_learns(tiny_handle):
    vec = make_vector(tiny_handle, layers=(1,))
    ids, mask = batch(tiny_handle)
    g = torch.tensor(0.0, requires_grad=True)
    with vec.apply(tiny_handle, gamma=g):
        zero = tiny_handle.run(ids, mask).detach()
        with torch.no_grad():
            g.fill_(2.0)
        two = tiny_handle.run(ids, mask).detach()
        for _ in range(2):  # a second backward works: nothing of the first graph is kept
            tiny_handle.run(ids, mask).sum().backward()
    with vec.apply(tiny_handle, gamma=2.0):
        fixed = tiny_handle.run(ids, mask).detach()
    assert torch.equal(two, fixed) and not torch.allclose(zero, two) and g.grad is not None


def test_last_steers_each_rows_last_real_token_in_a_right_padded_run(tiny_handle):
    vec = make_vector(tiny_handle, layers=(1,), positions="last")
    tok = tiny_handle.tokenizer
    short, long = (tok(t, add_special_tokens=False)["input_ids"] for t in ("d=2.", "a=3, b=4. what is a + b?"))
    ids = torch.tensor([short + [0] * (len(long) - len(short)), long])
    mask = torch.tensor([[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)])
    with vec.apply(tiny_handle, gamma=3.0):
        got = tiny_handle.run(ids, mask)
        alone = tiny_handle.run(torch.tensor([short]))
    assert torch.allclose(got[0, : len(short)], alone[0], atol=1e-4)


def test_layers_selects_what_is_checked_against_the_model(tiny_handle):
    g = tiny_handle.geometry
    m = VectorMeta(d_model=g.d_model, layers=(1, 7))
    vec = SteeringVector(torch.ones(2, g.d_model), m)
    assert list(vec.hooks(tiny_handle, gamma=1.0, layers=[1])) == ["blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match=r"layer 7 .*layers=\[\.\.\.\]"):
        vec.hooks(tiny_handle, gamma=1.0)
