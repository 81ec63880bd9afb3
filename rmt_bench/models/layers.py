"""Transformer-XL layers: relative multi-head attention with exact signed distances, feed-forward, block.

Notation: B batch, Q query length (the segment with its memory tokens), K key length (cache + Q),
H heads, Dh head size, P = K + Q - 1 distinct relative distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dropout(nn.Module):
    """nn.Dropout, with a faster mask on CPU: 16 random bits per element, drawn 64 at a time.

    torch's CPU bernoulli draws one Mersenne-Twister number per element and took a third of a training step
    here; four 16-bit lanes of one 64-bit draw make the same mask (drop probability round(p * 2^16) / 2^16)
    at a quarter of the draws. On CUDA this is plain F.dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._threshold = round(p * 65536) - 32768  # keep where the int16 lane is >= this

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        lanes = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)
        keep = lanes[:n].view(x.shape) >= self._threshold
        return x * keep * (1.0 / (1.0 - self.p))


class SinusoidalDistances(nn.Module):
    """Sinusoid embedding of relative distances (Transformer-XL, Dai et al. 2019, Sec. 3.3)."""

    def __init__(self, d_model: int):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, distances: Tensor) -> Tensor:
        """distances (P,) float -> (P, d_model)."""
        angles = distances[:, None] * self.inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_distances(query_len: int, key_len: int, clamp_len: int, device=None) -> Tensor:
    """The P = K + Q - 1 signed distances (query pos - key pos), largest first: K-1, ..., 1-Q.

    Queries are the last Q of K consecutive key positions. Negative distances occur where a query attends
    ahead (the bidirectional memory blocks of Sec. 3); they get their own sinusoid, as the paper requires.
    """
    d = torch.arange(key_len - 1, -query_len, -1.0, device=device)
    return d.clamp(-clamp_len, clamp_len) if clamp_len > 0 else d


def gather_relative(scores: Tensor, key_len: int) -> Tensor:
    """Pick, for every (query i, key j), the column of its own signed distance. Views only, no copy.

    scores (..., Q, P) holds (q_i + v) . r_d for every distance d = K-1 ... 1-Q (column c = K-1-d).
    Query i sits at position K-Q+i, so d(i, j) = K-Q+i-j and c = Q-1-i+j: one row down and one column right
    keeps c, i.e. (i, j) lies at flat offset (Q-1) + i*(P-1) + j of each (Q, P) block. Reading the flat
    block from offset Q-1 with rows of P-1 gives exactly that. Unlike Transformer-XL's `_rel_shift`, this is
    exact above the diagonal too (the memory rows of Sec. 3 attend ahead). -> (..., Q, K)
    """
    *lead, q, p = scores.shape
    if q == 1:  # one query: the distances K-1 ... 0 are already in key order
        return scores[..., :key_len]
    flat = scores.reshape(*lead, q * p)[..., q - 1 : q - 1 + q * (p - 1)]
    return flat.view(*lead, q, p - 1)[..., :key_len]


class RelMultiHeadAttention(nn.Module):
    """score(i, j) = (q_i + u) . k_j + (q_i + v) . W_r r_{i-j}; u, v shared by all layers (passed in)."""

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float):
        super().__init__()
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.q_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.kv_net = nn.Linear(d_model, 2 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = Dropout(dropout)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, L, d) -> keys and values (B, H, L, Dh), contiguous for the attention matmuls."""
        bsz, length, _ = x.shape
        k, val = self.kv_net(x).view(bsz, length, 2, self.n_head, self.d_head).permute(2, 0, 3, 1, 4).contiguous()
        return k, val

    def forward(
        self, h: Tensor, k: Tensor, val: Tensor, pos_emb: Tensor, u: Tensor, v: Tensor, mask_bias: Tensor
    ) -> Tensor:
        """h (B, Q, d) queries, the last Q of the K key positions; k, val (B, H, K, Dh); pos_emb (P, d);
        u, v (H, Dh); mask_bias (Q, K) with 0 where allowed and -inf elsewhere. -> (B, Q, d)"""
        bsz, qlen, _ = h.shape
        klen = k.shape[2]
        heads, scale = (self.n_head, self.d_head), self.d_head**-0.5
        q = self.q_net(h).view(bsz, qlen, *heads) * scale  # (B, Q, H, Dh)
        r = self.r_net(pos_emb).view(-1, *heads).permute(1, 2, 0)  # (H, Dh, P)
        # position term for every distance as one matmul per head, then each pair's own distance (a view)
        qv = (q + v * scale).permute(2, 0, 1, 3).reshape(self.n_head, bsz * qlen, self.d_head)  # (H, B*Q, Dh)
        bd = torch.bmm(qv, r.contiguous().to(qv.dtype)).view(self.n_head, bsz, qlen, -1)  # (H, B, Q, P)
        bias = gather_relative(bd, klen).transpose(0, 1) + mask_bias.to(bd.dtype)  # (B, H, Q, K)
        qu = (q + u * scale).transpose(1, 2).contiguous()  # (B, H, Q, Dh)
        scores = torch.matmul(qu, k.transpose(-1, -2).to(qu.dtype)) + bias  # (B, H, Q, K), already scaled
        prob = torch.softmax(scores.float(), dim=-1).to(val.dtype)
        if self.training and self.dropatt > 0:
            prob = F.dropout(prob, self.dropatt)
        out = torch.matmul(prob, val).transpose(1, 2).reshape(bsz, qlen, -1)  # (B, Q, H*Dh)
        return self.drop(self.o_net(out))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_inner),
            nn.ReLU(inplace=True),
            Dropout(dropout),
            nn.Linear(d_inner, d_model),
            Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Transformer-XL decoder layer: post-layer-norm by default (the paper's code), pre-norm as an option."""

    def __init__(
        self, d_model: int, n_head: int, d_head: int, d_inner: int, dropout: float, dropatt: float, pre_lnorm: bool
    ):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.attn = RelMultiHeadAttention(d_model, n_head, d_head, dropout, dropatt)
        self.ff = FeedForward(d_model, d_inner, dropout)
        self.norm_attn = nn.LayerNorm(d_model)
        self.norm_ff = nn.LayerNorm(d_model)

    def forward(
        self,
        h: Tensor,
        cache: Tensor | None,
        pos_emb: Tensor,
        u: Tensor,
        v: Tensor,
        mask_bias: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """h (B, Q, d), cache (B, M, d) or None -> (B, Q, d), and the keys and values (B, H, K, Dh) of every
        position attended to. `past` (decoding): the keys and values of the positions before h, returned by
        earlier calls; they stand for the cache and the earlier part of the segment."""
        context = h if cache is None else torch.cat([cache.to(h.dtype), h], dim=1)  # (B, M+Q, d)
        if self.pre_lnorm:
            context = self.norm_attn(context)
        k, val = self.attn.project_kv(context)
        if past is not None:
            k, val = torch.cat([past[0], k], dim=2), torch.cat([past[1], val], dim=2)
        queries = context[:, context.shape[1] - h.shape[1] :]  # the (normalised) h
        attended = self.attn(queries, k, val, pos_emb, u, v, mask_bias)
        if self.pre_lnorm:
            h = h + attended
            return h + self.ff(self.norm_ff(h)), (k, val)
        h = self.norm_attn(h + attended)
        return self.norm_ff(h + self.ff(h)), (k, val)
