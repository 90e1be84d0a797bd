"""Reasoning traces: the record, grading, segmentation and loaders (generation lives in ``generate``)."""

from .grading import (
    GRADERS,
    Grader,
    extract_boxed,
    extract_boxed_list,
    extract_gsm8k,
    extract_organism,
    grade,
    normalize_math,
)
from .loaders import (
    load_hf_dataset,
    load_thought_anchors,
    qwen2_tokenizer,
    read_jsonl,
    read_traces_jsonl,
    write_traces_jsonl,
)
from .record import Segment, Trace
from .segment import full_text, segment_trace, split_sentences

__all__ = [
    "GRADERS",
    "Grader",
    "Segment",
    "Trace",
    "extract_boxed",
    "extract_boxed_list",
    "extract_gsm8k",
    "extract_organism",
    "full_text",
    "grade",
    "load_hf_dataset",
    "load_thought_anchors",
    "normalize_math",
    "qwen2_tokenizer",
    "read_jsonl",
    "read_traces_jsonl",
    "segment_trace",
    "split_sentences",
    "write_traces_jsonl",
]
