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


def test_sum_by_runs_equals_one_sum_and_leaves_the_weights_alone(monkeypatch):
    """A run at a time gives the one-pass value and gradient, and only ``hidden``'s graph gets a gradient: weights
    the runs read (an unembedding) get no ``.grad``."""
    torch.manual_seed(0)
    w = torch.nn.Linear(8, 50)  # an unembedding whose weights require grad
    x = torch.randn(2, 7, 8, requires_grad=True)
    hidden = x * 2
    where = torch.rand(2, 7) < 0.6

    def part(h: torch.Tensor, at: tuple) -> torch.Tensor:
        return torch.log_softmax(w(h), -1)[..., 3].sum()

    want = part(hidden[where], ())
    (gx_want,) = torch.autograd.grad(want, x)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 100)  # 2 positions a run
    got = budget.sum_by_runs(x * 2, where, 50, part)
    (gx,) = torch.autograd.grad(got, x)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(gx, gx_want, atol=1e-6)
    assert w.weight.grad is None and w.bias.grad is None
