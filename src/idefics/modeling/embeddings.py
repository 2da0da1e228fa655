"""Decoupled embedding and LM head: a freezable base table plus `additional_vocab_size` always-trainable rows.

Ids >= `num_embeddings` index the additional rows; the LM head concatenates their logits after the regular ones.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import gather_vocab
from .layout import dense, project


class IdeficsDecoupledEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, num_additional_embeddings: int, embedding_dim: int, *, frozen: bool):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.num_additional_embeddings = num_additional_embeddings
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=not frozen)
        if num_additional_embeddings > 0:
            self.additional_embedding = nn.Embedding(num_additional_embeddings, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.num_additional_embeddings == 0:
            return F.embedding(input_ids, self.weight)
        is_extra = input_ids >= self.num_embeddings  # (b, t)
        regular = F.embedding(input_ids.masked_fill(is_extra, 0), self.weight)  # (b, t, d)
        extra = self.additional_embedding((input_ids - self.num_embeddings).clamp(min=0))  # (b, t, d)
        return torch.where(is_extra.unsqueeze(-1), extra, regular)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} + {self.num_additional_embeddings}, {self.weight.shape[1]}"


class IdeficsDecoupledLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, out_additional_features: int, *, frozen: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_additional_features = out_additional_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=not frozen)
        if out_additional_features > 0:
            self.additional_fc = nn.Linear(in_features, out_additional_features, bias=False)
        # Tensor parallelism (idefics.parallel): `weight` holds this rank's rows of the regular vocabulary, the
        # additional rows are whole on every rank, and the shards' logits are gathered (widths `tp_sizes`).
        self.tp_group = None
        self.tp_sizes: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = gather_vocab(dense(x, self.weight), self.tp_group, self.tp_sizes)  # (..., vocab)
        if self.out_additional_features > 0:
            logits = torch.cat([logits, project(self.additional_fc, x)], dim=-1)  # (..., vocab + additional)
        return logits

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features} + {self.out_additional_features}"
