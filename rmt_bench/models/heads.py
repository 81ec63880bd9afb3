"""Input embeddings and output heads: plain softmax, and Transformer-XL's adaptive softmax with tied weights.

Adaptive softmax (Grave et al. 2017) as the paper's code has it (ProjectedAdaptiveLogSoftmax): the vocabulary,
sorted by frequency, is cut at `cutoffs` (WikiText-103: 20000, 40000, 200000) into a head shortlist and tail
clusters; the head also scores one token per tail cluster. With `div_val` > 1 cluster i works in dimension
d_model / div_val^i through a projection. With `tie_weights` the output weights and projections are the input
embedding's (AdaptiveEmbedding), as Transformer-XL's WikiText-103 model (151M parameters with them tied).

Shapes: N tokens, d d_model, V vocabulary, V_i cluster i's size, d_i its dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AdaptiveEmbedding(nn.Module):
    """Token -> (.., d), scaled by sqrt(d). One table when div_val == 1; per-cluster tables and projections else."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: list[int], div_val: int):
        super().__init__()
        self.d_model, self.scale = d_model, math.sqrt(d_model)
        self.bounds = [0, *cutoffs, vocab_size]
        self.div_val = div_val
        dims = [d_model // div_val**i for i in range(len(self.bounds) - 1)] if div_val > 1 else [d_model]
        sizes = [b - a for a, b in zip(self.bounds, self.bounds[1:])] if div_val > 1 else [vocab_size]
        self.tables = nn.ModuleList(nn.Embedding(v, di) for v, di in zip(sizes, dims))
        self.projs = nn.ParameterList(
            nn.Parameter(torch.randn(d_model, di) * 0.02) for di in dims if div_val > 1
        )  # (d, d_i): d_i -> d

    @property
    def weight(self) -> Tensor:  # the single table (div_val == 1), for plain tying
        return self.tables[0].weight

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            return self.tables[0](tokens) * self.scale
        flat = tokens.reshape(-1)
        out = torch.zeros(flat.shape[0], self.d_model, device=tokens.device, dtype=self.projs[0].dtype)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, F.linear(self.tables[i](flat[idx] - lo), self.projs[i]).to(out.dtype))
        return out.view(*tokens.shape, self.d_model) * self.scale


class SoftmaxHead(nn.Module):
    """Plain softmax over the vocabulary (optionally tied to the input embedding)."""

    def __init__(self, d_model: int, vocab_size: int, tied: Tensor | None = None):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size)
        if tied is not None:
            self.proj.weight = tied

    @classmethod
    def around(cls, proj: nn.Module) -> SoftmaxHead:
        """The head over a given output layer (a wrapped Hugging Face model's LM head, models/hf.py)."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.proj = proj
        return head

    def logits(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """hidden (N, d), targets (N,) -> per-token negative log-likelihood (N,), fp32."""
        return F.cross_entropy(self.logits(hidden).float(), targets, reduction="none")

    def loss(self, hidden: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        return (self.nll(hidden, targets) * weights).sum()


class AdaptiveSoftmaxHead(nn.Module):
    def __init__(
        self, d_model: int, vocab_size: int, cutoffs: list[int], div_val: int, tied: AdaptiveEmbedding | None = None
    ):
        super().__init__()
        self.bounds = [0, *cutoffs, vocab_size]
        self.n_tail = len(cutoffs)
        n_clusters = len(self.bounds) - 1
        dims = [d_model // div_val**i for i in range(n_clusters)] if div_val > 1 else [d_model] * n_clusters
        self.cluster = nn.Linear(d_model, self.n_tail)  # head scores of the tail clusters
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(b - a)) for a, b in zip(self.bounds, self.bounds[1:]))
        self.tied = tied
        if tied is None:
            self.weights = nn.ParameterList(
                nn.Parameter(torch.randn(b - a, di) * 0.02)
                for (a, b), di in zip(zip(self.bounds, self.bounds[1:]), dims)
            )
            self.projs = nn.ParameterList(nn.Parameter(torch.randn(d_model, di) * 0.02) for di in dims if div_val > 1)
        self.div_val = div_val

    def _weight(self, i: int) -> Tensor:
        if self.tied is None:
            return self.weights[i]
        if self.div_val == 1:
            return self.tied.weight[self.bounds[i] : self.bounds[i + 1]]
        return self.tied.tables[i].weight

    def _proj(self, i: int) -> Tensor | None:
        if self.div_val == 1:
            return None
        return (self.tied.projs if self.tied is not None else self.projs)[i]

    def _cluster_logits(self, hidden: Tensor, i: int) -> Tensor:
        proj = self._proj(i)
        h = hidden if proj is None else hidden @ proj.to(hidden.dtype)  # (N, d_i)
        return F.linear(h, self._weight(i).to(h.dtype), self.biases[i].to(h.dtype))  # (N, V_i)

    def _head_logprob(self, hidden: Tensor) -> Tensor:
        head = torch.cat([self._cluster_logits(hidden, 0), self.cluster(hidden)], dim=-1)
        return F.log_softmax(head.float(), dim=-1)  # (N, V_0 + n_tail)

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (N,); each tail is scored only for the tokens that fall in it."""
        head = self._head_logprob(hidden)
        shortlist = self.bounds[1]
        nll = -head.gather(1, targets.clamp(max=shortlist - 1)[:, None]).squeeze(1)
        for i in range(1, self.n_tail + 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((targets >= lo) & (targets < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            tail = F.log_softmax(self._cluster_logits(hidden[idx], i).float(), dim=-1)
            logp = head[idx, shortlist + i - 1] + tail.gather(1, (targets[idx] - lo)[:, None]).squeeze(1)
            nll = nll.index_put((idx,), -logp)
        return nll

    def loss(self, hidden: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        return (self.nll(hidden, targets) * weights).sum()

    def log_prob(self, hidden: Tensor) -> Tensor:
        """Full (N, V) log-probabilities (for argmax and tests; training uses `nll`)."""
        head = self._head_logprob(hidden)
        shortlist = self.bounds[1]
        parts = [head[:, :shortlist]]
        for i in range(1, self.n_tail + 1):
            tail = F.log_softmax(self._cluster_logits(hidden, i).float(), dim=-1)
            parts.append(head[:, shortlist + i - 1 : shortlist + i] + tail)
        return torch.cat(parts, dim=-1)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.log_prob(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)


def build_embedding_and_head(d_model: int, vocab_size: int, cutoffs: list[int], div_val: int, tie: bool):
    """-> (embedding, head). Plain softmax when `cutoffs` is empty."""
    if not cutoffs:
        embed = AdaptiveEmbedding(vocab_size, d_model, [], 1)
        return embed, SoftmaxHead(d_model, vocab_size, embed.weight if tie else None)
    embed = AdaptiveEmbedding(vocab_size, d_model, cutoffs, div_val)
    return embed, AdaptiveSoftmaxHead(d_model, vocab_size, cutoffs, div_val, embed if tie else None)
