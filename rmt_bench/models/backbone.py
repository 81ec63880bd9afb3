"""The one backbone every model shares: embeddings -> Transformer-XL blocks -> (norm) -> output head.

No recurrence lives here: the segment loop (`recurrence.py`) decides what goes in (memory tokens, cache)
and what is carried out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rmt_bench.config import ModelConfig
from rmt_bench.models.heads import build_embedding_and_head
from rmt_bench.models.layers import Block, Dropout, KVBuffer, SinusoidalDistances, relative_distances


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # scaled by sqrt(d_model) as Transformer-XL; adaptive (and tied) for large vocabularies
        self.embed, self.head = build_embedding_and_head(
            d, vocab_size, cfg.adaptive_cutoffs, cfg.div_val, cfg.tie_weights
        )
        self.distances = SinusoidalDistances(d)
        self.drop = Dropout(cfg.dropout)
        # the two global biases of Transformer-XL, shared by all layers (attn_type 0)
        self.u = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
        self.v = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
        self.layers = nn.ModuleList(
            Block(d, cfg.n_head, cfg.d_head, cfg.d_inner, cfg.dropout, cfg.dropatt, cfg.pre_lnorm)
            for _ in range(cfg.n_layer)
        )
        self.final_norm = nn.LayerNorm(d) if cfg.pre_lnorm else nn.Identity()
        self.apply(self._init)
        for name, param in self.named_parameters():
            if name in ("u", "v") or (".projs." in name or ".weights." in name):
                nn.init.normal_(param, 0.0, cfg.init_std)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> (B, T, d), scaled and dropped out."""
        return self.drop(self.embed(tokens))

    def forward(
        self,
        h: Tensor,
        caches: list[Tensor] | None,
        mask_bias: Tensor,
        past: list[KVBuffer] | None = None,
        capture: list | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """h (B, Q, d) input vectors (memory + token embeddings), the last Q of the K = mask_bias.shape[1] key
        positions; caches: per layer (B, M, d) or None; past (decoding): per layer the buffer of the keys and
        values of the positions before h (the cache's among them once filled), appended to by this call.
        `capture` (inspection only): each layer's attention probabilities (B, H, Q, K) are appended to it, in order.
        -> final hidden (B, Q, d) and each layer's input (B, Q, d) for the XL cache."""
        qlen = h.shape[1]
        klen = mask_bias.shape[1]
        pos_emb = self.drop(self.distances(relative_distances(qlen, klen, self.cfg.clamp_len, h.device)))
        layer_inputs = []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(h)
            cache, kv = caches[i] if caches else None, past[i] if past else None
            h = layer(h, cache, pos_emb, self.u, self.v, mask_bias, kv, capture)
        return self.final_norm(h), layer_inputs
