"""Activation store: sharded, append-only, memory-mappable activations on disk, checked on read.

Layout of a store directory (an artifact of kind ``activation_store``, see :mod:`reasonscope.artifacts`)::

    manifest.json                      # job (config, inputs by content hash); every shard's size, rows, sha256
    shards/shard-00007.safetensors     # traces trace_ids[7*shard_size:(8)*shard_size]

Each shard is a plain safetensors file holding ``act/<hook>`` ``[n_rows, d]`` tensors in the
storage dtype and the int64 row index ``row/trace``, ``row/position``, ``row/token_id``,
``row/segment`` (rows grouped by trace in job order). Shards are written atomically
(:mod:`.writer`); while a job runs each finished shard has a record file beside it, folded into
the manifest by ``finalize``. A killed job is resumed by running the same command again. Reads
(:mod:`.reader`) go one shard at a time and refuse a missing, truncated or altered shard.
"""

from __future__ import annotations

from ..identity import weight_hash
from .manifest import PADDING_SIDES, POSITION_RULES, ROW_KEYS, PaddingSide, PositionRule, StoreManifest
from .reader import ActivationStore, CorruptShardError
from .writer import StoreWriteError, StoreWriter

__all__ = [
    "PADDING_SIDES",
    "POSITION_RULES",
    "ROW_KEYS",
    "ActivationStore",
    "CorruptShardError",
    "PaddingSide",
    "PositionRule",
    "StoreManifest",
    "StoreWriteError",
    "StoreWriter",
    "weight_hash",
]
