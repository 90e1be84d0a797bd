"""Many probes trained at once: one per (label variant, layer), as batched tensors (probes.md §5.6).

Logistic: ``logit = x . w + b``; MLP (Zhang et al. 2025): ``Linear(d, h) -> ReLU -> Linear(h, 1)``. Parameters
have leading dims ``[V, L]`` (label variants, layers); inputs ``[L, n, d]`` are standardised with train-split
statistics kept in the module, so a fitted probe takes raw activations.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

ProbeKind = Literal["logistic", "mlp"]
PROBE_KINDS: tuple[ProbeKind, ...] = get_args(ProbeKind)


class BatchedProbe(nn.Module):
    """``V x L`` independent probes over ``L`` layers of width ``d``; ``forward`` gives logits ``[V, L, n]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_variants: int, n_layers: int, width: int, kind: ProbeKind, hidden: int = 0, seed: int = 0):
        super().__init__()
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
        self.kind, self.hidden = kind, hidden
        gen = torch.Generator().manual_seed(seed)
        v, n, d = n_variants, n_layers, width
        self.register_buffer("mean", torch.zeros(n, d))
        self.register_buffer("std", torch.ones(n, d))
        if kind == "logistic":
            self.w = nn.Parameter(torch.zeros(v, n, d))
            self.b = nn.Parameter(torch.zeros(v, n))
        else:
            if hidden < 1:
                raise ValueError(f"an MLP probe needs hidden >= 1, got {hidden}")
            self.w1 = nn.Parameter(torch.randn(v, n, d, hidden, generator=gen) / d**0.5)
            self.b1 = nn.Parameter(torch.zeros(v, n, hidden))
            self.w2 = nn.Parameter(torch.randn(v, n, hidden, generator=gen) / hidden**0.5)
            self.b = nn.Parameter(torch.zeros(v, n))

    def _first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-layer weights and bias with the standardisation folded in: ``((x - m) / s) @ w = x @ (w / s) - ...``.

        Training stays in standardised coordinates (good conditioning) without materialising ``(x - m) / s``.
        """
        inv = 1.0 / self.std
        if self.kind == "logistic":
            w = self.w * inv
            return w, self.b - (w * self.mean).sum(-1)
        w1 = self.w1 * inv[..., None]
        return w1, self.b1 - torch.einsum("ld,vldh->vlh", self.mean, w1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._first()
        if self.kind == "logistic":
            return torch.einsum("lnd,vld->vln", x, w) + b[..., None]
        h = torch.relu(torch.einsum("lnd,vldh->vlnh", x, w) + b[:, :, None])
        return torch.einsum("vlnh,vlh->vln", h, self.w2) + self.b[..., None]

    def layer_logits(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits ``[V, n]`` of the probes of one ``layer`` for its activations ``x`` ``[n, d]``."""
        w, b = self._first()
        if self.kind == "logistic":
            return torch.einsum("nd,vd->vn", x, w[:, layer]) + b[:, layer, None]
        h = torch.relu(torch.einsum("nd,vdh->vnh", x, w[:, layer]) + b[:, layer, None])
        return torch.einsum("vnh,vh->vn", h, self.w2[:, layer]) + self.b[:, layer, None]

    def select(self, variant: int) -> dict[str, torch.Tensor]:
        """The tensors of one label variant (all layers), for saving."""
        out = {"mean": self.mean, "std": self.std}
        for name, p in self.named_parameters():
            out[name] = p.detach()[variant]
        return {k: v.contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: ProbeKind) -> BatchedProbe:
        """One-variant probe from :meth:`select`'s tensors."""
        n, d = tensors["mean"].shape
        hidden = int(tensors["b1"].shape[-1]) if kind == "mlp" else 0
        probe = cls(1, n, d, kind, hidden)
        with torch.no_grad():
            for name, t in tensors.items():
                target = getattr(probe, name)
                target.copy_(t if name in ("mean", "std") else t[None])
        return probe
