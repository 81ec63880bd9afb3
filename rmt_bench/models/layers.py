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

    torch's CPU bernoulli draws one Mersenne-Twister number per element (docs/PERFORMANCE.md: its share of a
    training step); four 16-bit lanes of one 64-bit draw make the same mask (drop probability round(p * 2^16) /
    2^16) at a quarter of the draws. On CUDA this is plain F.dropout.
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
    """score(i, j) = (q_i + u) . k_j + (q_i + v) . W_r r_{i-j}; u, v shared by all layers (passed in).

    Head-major layout throughout, (H, B, L, Dh): one copy puts the stacked projection's queries, keys and
    values there, every product is then one batched matmul over H*B without further copies, and the content
    term is added to the position term inside the matmul (baddbmm).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float):
        super().__init__()
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.q_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.kv_net = nn.Linear(d_model, 2 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = Dropout(dropout)

    def project(self, x: Tensor, keys_only: Tensor | None, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, Q, d) the query rows (also keys), keys_only (B, M, d) or None: rows before them that are only
        keys (the Transformer-XL cache). -> (q + u) / sqrt(Dh) (H, B, Q, Dh), keys and values (H, B, M+Q, Dh).

        One matmul gives the query rows' queries, keys and values (q_net and kv_net stacked, the scale and u
        folded into the weight and bias: score(i, j) needs only q + u and q + v, both scaled)."""
        bsz, qlen, _ = x.shape
        heads, scale = (self.n_head, self.d_head), self.d_head**-0.5
        weight = torch.cat([self.q_net.weight * scale, self.kv_net.weight])  # (3 H Dh, d)
        bias = torch.cat([u.reshape(-1) * scale, u.new_zeros(2 * u.numel())])
        qkv = F.linear(x, weight.to(x.dtype), bias.to(x.dtype)).view(bsz, qlen, 3, *heads).permute(2, 3, 0, 1, 4)
        if keys_only is None:
            q, k, val = qkv.contiguous()  # (3, H, B, Q, Dh): the one copy
            return q, k, val
        old = self.kv_net(keys_only.to(x.dtype)).view(bsz, -1, 2, *heads).permute(2, 3, 0, 1, 4)  # (2, H, B, M, Dh)
        k, val = torch.cat([old, qkv[1:]], dim=3)  # (2, H, B, M+Q, Dh), contiguous
        return qkv[0].contiguous(), k, val

    def forward(
        self,
        qu: Tensor,
        k: Tensor,
        val: Tensor,
        pos_emb: Tensor,
        u: Tensor,
        v: Tensor,
        mask_bias: Tensor,
        capture: list | None = None,
    ) -> Tensor:
        """qu (H, B, Q, Dh): (q + u) / sqrt(Dh) of the last Q of the K key positions (`project`); k, val
        (H, B, K, Dh); pos_emb (P, d); u, v (H, Dh); mask_bias (Q, K), 0 where allowed, -inf elsewhere.
        `capture` (inspection only; None in training): the attention probabilities (B, H, Q, K) are appended to it.
        -> (B, Q, d)"""
        n_head, bsz, qlen, d_head = qu.shape
        klen = k.shape[2]
        r = self.r_net(pos_emb).view(-1, n_head, d_head).permute(1, 2, 0).to(qu.dtype)  # (H, Dh, P)
        qv = qu + ((v - u) * d_head**-0.5).to(qu.dtype)[:, None, None, :]  # (q + v) / sqrt(Dh), (H, B, Q, Dh)
        # position term for every distance, one matmul per head over B*Q rows; then each pair's own distance
        bd = torch.bmm(qv.view(n_head, bsz * qlen, d_head), r).view(n_head, bsz, qlen, -1)  # (H, B, Q, P)
        bias = gather_relative(bd, klen) + mask_bias.to(bd.dtype)  # (H, B, Q, K)
        batch = n_head * bsz
        scores = torch.baddbmm(
            bias.view(batch, qlen, klen), qu.view(batch, qlen, d_head), k.view(batch, klen, d_head).transpose(1, 2)
        )  # (H*B, Q, K), already scaled
        # fp32 softmax (in bf16 autocast too): torch's bf16 CPU softmax is 3x slower on rows of 24 keys
        prob = torch.softmax(scores, dim=-1, dtype=torch.float32).to(val.dtype)
        if capture is not None:
            capture.append(prob.detach().view(n_head, bsz, qlen, klen).transpose(0, 1).float())  # (B, H, Q, K)
        if self.training and self.dropatt > 0:
            prob = F.dropout(prob, self.dropatt)
        out = torch.bmm(prob, val.view(batch, klen, d_head)).view(n_head, bsz, qlen, d_head)
        out = out.permute(1, 2, 0, 3).reshape(bsz, qlen, n_head * d_head)  # (B, Q, H*Dh)
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


class KVBuffer:
    """A layer's keys and values while a segment is decoded (no grad): preallocated (H, B, K_max, Dh) and filled
    block by block, so a generated token appends one position instead of re-concatenating all of them."""

    def __init__(self, k_max: int):
        self.k_max, self.length = k_max, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (H, B, L, Dh) of the next L positions -> the keys and values of all positions so far (views)."""
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], self.k_max, k.shape[3])
            self.v = v.new_empty(self.k.shape)
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


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
        past: KVBuffer | None = None,
        capture: list | None = None,
    ) -> Tensor:
        """h (B, Q, d), cache (B, M, d) or None -> (B, Q, d). `past` (decoding): the keys and values of the
        positions before h, filled by earlier calls (the cache and the earlier part of the segment); this call's
        are appended to it. `capture`: see `RelMultiHeadAttention.forward`."""
        x = self.norm_attn(h) if self.pre_lnorm else h  # the query rows, (normalised) h
        keys_only = None if cache is None else self.norm_attn(cache) if self.pre_lnorm else cache
        q, k, val = self.attn.project(x, keys_only, u)
        if past is not None:
            k, val = past.append(k, val)
        attended = self.attn(q, k, val, pos_emb, u, v, mask_bias, capture)
        if self.pre_lnorm:
            h = h + attended
            return h + self.ff(self.norm_ff(h))
        h = self.norm_attn(h + attended)
        return self.norm_ff(h + self.ff(h))
