"""The organisms' tokenizer: a Qwen2 byte-level BPE trained on the task's text.

It is a genuine ``Qwen2Tokenizer`` (Qwen's pre-tokenizer regex, byte-level BPE, ``tokenizer.json``),
so ``AutoTokenizer``, TransformerBridge and nnsight load an organism exactly like a real
DeepSeek-R1-Distill-Qwen checkpoint. Training is deterministic (fixed corpus seed).
"""

from __future__ import annotations

import json
from typing import Any

from ..traces.record import THINK_END, THINK_START
from .task import corpus

PAD, EOS = "<|pad|>", "<|end|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = [EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END]
VOCAB_SIZE = 400


def speaks_organism(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has the organisms' chat markers, so that organism questions are ones its model answers."""
    vocab = tokenizer.get_vocab()
    return USER in vocab and ASSISTANT in vocab


def chat_template(thinking: bool) -> str:
    """Jinja chat template; the thinking organism's generation prompt ends with ``<think>``."""
    opener = THINK_START if thinking else ""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + opener + "{% endif %}"
    )


def build_tokenizer(thinking: bool = True):
    """Train the BPE on the task corpus and wrap it as a left-padding ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    core.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,  # type: ignore[arg-type]  # (a, b) pairs, which the tokenizers backend accepts
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE: every byte is in the vocabulary
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT, THINK_START, THINK_END],
        padding_side="left",
    )
    tok.add_tokens([THINK_START, THINK_END, USER, ASSISTANT], special_tokens=True)
    tok.chat_template = chat_template(thinking)
    return tok
