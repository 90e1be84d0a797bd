"""``reasonscope.budget``: forward passes sized so their logits fit the logit budget."""

from __future__ import annotations

import torch

from reasonscope import budget


def test_passes_keep_rows_times_widest_within_the_budget(monkeypatch):
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 100)
    # vocab 10: 10 token-rows a pass; the widest row so far sets the width
    assert budget.passes([2, 3, 4, 5, 20, 1], 10) == [[0, 1], [2, 3], [4], [5]]
    assert budget.passes([1] * 7, 10) == [[0, 1, 2, 3, 4, 5, 6]]
    assert budget.passes([1] * 7, 10, max_rows=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert budget.passes([], 10) == []
    assert budget.rows_per_pass(3, 10) == 3 and budget.rows_per_pass(20, 10) == 1


def test_vocab_size_is_the_unembedding_rows(tiny_handle):
    assert budget.vocab_size(tiny_handle) == tiny_handle.run(torch.tensor([[1, 2]])).shape[-1]
