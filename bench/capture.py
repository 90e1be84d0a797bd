"""Capture throughput and peak memory: the forward pass capture needs vs reasonscope vs TransformerBridge vs nnsight.

Usage: python bench/capture.py [--shape small|1.5b] [--batch 4] [--seq 256] [--batches 3] [--repeats 5]

Same random-weight model, same tokens, same batch for every method; the residual stream of every
layer is captured. Each method runs in its own subprocess so that its peak memory is its own.
Shapes: ``1.5b`` is the real DeepSeek-R1-Distill-Qwen-1.5B / Qwen2-1.5B config from ../shared/data
(bf16 on GPU), ``small`` a narrower Qwen2 (8 layers, d_model 512) with the same 151k vocabulary for CPU.

Columns:
- tokens/s: tokens of ``--batches`` batches of ``--batch`` x ``--seq`` over wall time; the median of
  ``--repeats`` timed repeats (after one warm-up batch), with the min and max.
- x reference: median over the median of (a). Reference (a) is the physical limit of capture: the HF
  forward pass through the decoder layers up to the last hooked one, without hooks and without the LM
  head, with the same attention implementation and dtype as (b) and (c). Capture cannot beat it, so
  1 - ratio is capture's own overhead (gathering rows, casting, copying to host, writing shards).
  (f), the full forward with the LM head, shows what a "plain forward" costs: on ``small`` the 151k-vocab
  head is most of it, which is why it is no reference for capture.
- peak memory: CUDA ``max_memory_allocated`` on GPU; peak RSS of the method's process on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from shapes import QWEN2, count

METHODS = {
    "a": "reference: HF forward to the last hooked layer (no hooks, no LM head)",
    "b": "reasonscope capture -> host memory",
    "c": "reasonscope capture -> store on disk",
    "d": "TransformerBridge run_with_cache(names_filter)",
    "e": "nnsight trace + .save() every layer",
    "f": "full HF forward incl. LM head (no hooks)",
}


def build_model_dir(shape: str, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from reasonscope.traces.loaders import qwen2_tokenizer

    cfg = AutoConfig.from_pretrained(QWEN2)
    if shape == "small":
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1536, 8
        cfg.num_attention_heads, cfg.num_key_value_heads = 8, 2
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    qwen2_tokenizer(QWEN2).save_pretrained(out)
    return out


def run_method(
    method: str, model_dir: str, batch: int, seq: int, batches: int, repeats: int, device: str, dtype: str
) -> dict:
    from reasonscope.models import load_model

    cuda = device == "cuda"
    backend = {"d": "transformer_lens", "e": "nnsight"}.get(method, "hf")
    h = load_model(model_dir, backend=backend, dtype=dtype, device=device)
    n_layers = h.geometry.n_layers
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 150000, (batch, seq), generator=g) for _ in range(batches)]
    mask = torch.ones(batch, seq, dtype=torch.long)

    from reasonscope.capture import CaptureConfig, capture, capture_batch
    from reasonscope.traces.record import Trace

    cfg = CaptureConfig(
        hooks=names,
        positions="all",
        dtype="float32" if dtype == "float32" else "bfloat16",
        token_budget=batch * seq,
        shard_size=batch,
    )

    last = max(int(n.split(".")[1]) for n in names)
    decoder = h.model.model  # the base model: embeddings, decoder layers, final norm

    def traces_of(x: torch.Tensor, k: int) -> list[Trace]:
        return [
            Trace(id=f"{k}-{i}", prompt="", thinking="", answer="", token_ids=x[i].tolist(), think_span=(0, seq))
            for i in range(len(x))
        ]

    def to_store(traces: list[Trace]) -> None:
        with tempfile.TemporaryDirectory() as d:
            capture(h, traces, cfg, str(Path(d) / "store"))

    def step(x: torch.Tensor, k: int) -> None:
        if method == "a":
            full = decoder.layers
            decoder.layers = torch.nn.ModuleList(full[: last + 1])
            try:
                with torch.inference_mode():
                    decoder(input_ids=x.to(h.device), attention_mask=mask.to(h.device))
            finally:
                decoder.layers = full
        elif method == "f":
            with torch.inference_mode():
                h.model(input_ids=x.to(h.device), attention_mask=mask.to(h.device))
        elif method == "b":
            capture_batch(h, traces_of(x, k), [torch.arange(seq)] * batch, cfg)
        elif method == "c":  # the timed run is the whole job (below); the warm-up writes one batch
            to_store(traces_of(x, k))
        elif method == "d":
            with torch.inference_mode():
                _, cache = h.wrapper.run_with_cache(x.to(h.device), names_filter=lambda n: n in names)
            del cache
        elif method == "e":
            saved: list = []  # filled inside the trace (nnsight cannot bind new locals of a nested function)
            with torch.inference_mode(), h.wrapper.trace(x.to(h.device)):
                for layer in range(n_layers):
                    saved.append(h.wrapper.model.layers[layer].output.save())
            assert len(saved) == n_layers and saved[-1].shape[-1] == h.geometry.d_model

    step(ids[0], -1)  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        if method == "c":
            to_store([tr for k, x in enumerate(ids) for tr in traces_of(x, k)])
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
        else:
            for k, x in enumerate(ids):
                step(x, k)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
        rates.append(batch * seq * batches / elapsed)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "tokens_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "peak_gib": peak / 2**30,
        "attn": h.model.config._attn_implementation,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["small", "1.5b"], default="small")
    p.add_argument("--batch", type=count, default=4)
    p.add_argument("--seq", type=count, default=256)
    p.add_argument("--batches", type=count, default=3)
    p.add_argument("--repeats", type=count, default=5, help="timed repeats per method (median, min, max)")
    p.add_argument("--methods", default="abcdef")
    p.add_argument("--_run", help=argparse.SUPPRESS)
    p.add_argument("--_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.methods or not set(a.methods) <= METHODS.keys():
        p.error(f"--methods {a.methods!r}: letters among {''.join(METHODS)} (e.g. abc), no separators")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    if a._run:
        print(json.dumps(run_method(a._run, a._dir, a.batch, a.seq, a.batches, a.repeats, device, dtype)))
        return
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_model_dir(a.shape, Path(d) / "model")
        rows = {}
        for m in a.methods:
            cmd = [
                sys.executable,
                __file__,
                "--_run",
                m,
                "--_dir",
                str(model_dir),
                "--batch",
                str(a.batch),
                "--seq",
                str(a.seq),
                "--batches",
                str(a.batches),
                "--repeats",
                str(a.repeats),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"method {m} failed")
            rows[m] = json.loads(res.stdout.strip().splitlines()[-1])
    base = rows.get("a", {}).get("tokens_per_s")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\ncapture benchmark: shape={a.shape} device={name} dtype={dtype} batch={a.batch} seq={a.seq} "
        f"batches={a.batches} repeats={a.repeats}, residual stream of every layer"
    )
    print(
        "tokens/s: median (min-max) of the repeats; x reference: median / median of (a), the forward pass up to "
        "the last hooked layer with the same attention and dtype (capture's physical limit)"
    )
    mem = "CUDA" if device == "cuda" else "RSS"
    print(f"| method | attention | tokens/s | min | max | x reference | peak memory (GiB, {mem}) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        rel = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        print(
            f"| ({m}) {METHODS[m]} | {r['attn']} | {r['tokens_per_s']:,.0f} | {r['min']:,.0f} | {r['max']:,.0f} | "
            f"{rel} | {r['peak_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
