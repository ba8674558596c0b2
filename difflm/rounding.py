"""Embeddings <-> tokens: the rounding head p(w | x0) tied to the embedding, and the clamping trick."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rounding_logits(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Logits of p(w | x) = softmax(x E^T) (Diffusion-LM's tied rounding head). x (B, L, d), E (V, d) -> (B, L, V)."""
    return F.linear(x, embedding)


def rounding_nll(x: torch.Tensor, embedding: torch.Tensor, ids: torch.Tensor,
                 keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-log p(w | x) summed over positions (those where `keep` (B, L) is true, if given), per example: (B,)."""
    logits = rounding_logits(x, embedding)
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return (nll if keep is None else nll * keep).sum(dim=1)


def round_to_tokens(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """argmax_w p(w | x): (B, L) ids."""
    return rounding_logits(x, embedding).argmax(dim=-1)


def nearest_embedding(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Each vector replaced by its nearest embedding in L2 (Diffusion-LM's clamping trick, sec. 4.2)."""
    dist = (x * x).sum(-1, keepdim=True) - 2 * F.linear(x, embedding) + (embedding * embedding).sum(-1)  # (B, L, V)
    return embedding[dist.argmin(dim=-1)]
