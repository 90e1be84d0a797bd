"""Export one hook of a store in the Arrow layout of SAELens' ``CacheActivationsRunner``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..artifacts import ARTIFACT_FORMATS, ArtifactDir, ArtifactError, write_artifact
from ..dtypes import torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from .reader import ActivationStore

KIND = "saelens_activations"
FORMAT = ARTIFACT_FORMATS[KIND]


def to_hf_dataset(
    store: ActivationStore,
    hook: str,
    path: str | Path | None = None,
    *,
    context_size: int = 1,
    dtype: str = "float32",
) -> datasets.Dataset:
    """Convert one hook to the Arrow layout SAELens' ``CacheActivationsRunner`` writes.

    Columns: ``<hook>``: ``Array2D(shape=(context_size, d), dtype)`` and ``token_ids``:
    ``Sequence(int32, length=context_size)``; consecutive rows are packed ``context_size`` at a
    time (a final remainder shorter than ``context_size`` is dropped). With ``path`` the dataset
    is written there as an artifact (``save_to_disk`` layout plus ``manifest.json``, atomically) and
    returned memory-mapped; a second call with the same arguments reuses it. Without ``path`` it is
    built in memory. SAELens then reads it with its own cached-activations reader and trains on it::

        store.to_hf_dataset(hook, "acts_hf")          # the one call
        acts = sae_lens.ActivationsStore(
            model=None, dataset=None, cached_activations_path="acts_hf", hook_name=hook,
            context_size=1, d_in=store.manifest.hooks[hook], streaming=False, hook_head_index=None,
            n_batches_in_buffer=512, total_training_tokens=len(store), store_batch_size_prompts=256,
            train_batch_size_tokens=512, prepend_bos=False, normalize_activations="none",
            device=torch.device("cpu"), dtype="float32")
        sae_lens.SAETrainer(SAETrainerConfig(total_training_samples=..., train_batch_size_samples=512,
            lr=3e-4, lr_end=3e-4), training_sae, data_provider=acts).fit()

    (``n_batches_in_buffer * context_size`` must be >= ``train_batch_size_tokens``, and
    ``store_batch_size_prompts`` at most the dataset's rows: SAELens reads that many rows a batch, fails on a shorter
    first one and drops the remainder each epoch; a small store, such as the README's 8 traces, needs a small one.)
    SAELens' ``LanguageModelSAETrainingRunner`` is not usable here: it loads a model and a text dataset
    even with ``use_cached_activations=True``.
    """
    import datasets
    import pyarrow as pa
    from datasets import Array2D, Features, Value
    from datasets import Sequence as HFSequence
    from datasets.arrow_writer import ArrowWriter

    store._act_key(hook)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"Arrow dtype must be 'float32' or 'float16' (Arrow has no bfloat16), got {dtype!r}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    d = store.manifest.hooks[hook]
    features = Features(
        {
            hook: Array2D(shape=(context_size, d), dtype=dtype),
            "token_ids": HFSequence(Value("int32"), length=context_size),
        }
    )
    n_rows = len(store)
    config = {
        "hook": hook,
        "context_size": context_size,
        "dtype": dtype,
        "shards": store.completed_shards(),
        "n_rows": n_rows,
        "n_sequences": n_rows // context_size,
    }
    inputs = {"store": store.manifest.fingerprint()}
    if path is not None:
        path = Path(path)
        if path.exists():
            try:
                art = ArtifactDir.open(path, KIND, FORMAT)
                same = dict(art.manifest.config) == config and dict(art.manifest.inputs) == inputs
            except ArtifactError:
                same = False
            if not same:
                raise FileExistsError(f"{path} exists and is not this conversion; delete it or choose another path")
            return datasets.load_from_disk(str(path))

    chunk = context_size * max(1, (1 << 24) // (d * context_size))  # ~64 MiB of float32 per write

    def fill(writer: Any) -> None:
        for x, tok in store.iter_chunks(hook, chunk, torch_dtype(dtype)):
            if not bool(torch.isfinite(x).all()):  # a bfloat16/float32 store past float16's range (65504)
                raise ValueError(
                    f"{hook} of {store.path} overflows {dtype} (|x| > 65504); convert with dtype='float32'"
                )
            k = x.shape[0] // context_size * context_size  # only the last chunk can be short
            if k:
                writer.write_batch(
                    {
                        hook: x[:k].reshape(-1, context_size, d).numpy(),
                        "token_ids": tok[:k].to(torch.int32).reshape(-1, context_size).numpy(),
                    }
                )
        writer.finalize()

    if path is None:
        stream = pa.BufferOutputStream()
        with ArrowWriter(features=features, stream=stream) as w:
            fill(w)
        return datasets.Dataset.from_buffer(stream.getvalue())

    def write_files(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.stream.", dir=path.parent) as work:
            with ArrowWriter(features=features, path=str(Path(work) / "stream.arrow")) as w:
                fill(w)
            datasets.Dataset.from_file(str(Path(work) / "stream.arrow")).save_to_disk(str(tmp))

    write_artifact(path, KIND, FORMAT, config, inputs, write_files, detail={"store": str(store.path.resolve())})
    return datasets.load_from_disk(str(path))
