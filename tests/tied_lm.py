"""A tiny model with an LM head tied to its embedding, for the CPU linear-packing tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedLM(torch.nn.Module):
    """Embedding, a ReLU MLP with a residual, and an LM head that reuses the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.proj = torch.nn.Linear(32, 48, bias=True)
        self.down = torch.nn.Linear(48, 32, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.proj(h)))
        return F.linear(h, self.embed.weight)  # LM head tied to the embedding
