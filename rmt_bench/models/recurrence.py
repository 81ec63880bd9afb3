"""The one segment loop for every model of the paper.

A segment's input is `[read memory ; tokens ; write memory]` (RMT, Sec. 3), `[memory ; tokens]` (MemTr) or
`tokens` (vanilla, Transformer-XL); a Transformer-XL cache of the previous `mem_len` layer inputs may sit in
front of it. Positions are consecutive over `[cache ; read ; tokens ; write]` and enter attention only as
relative distances, so memory tokens take ordinary positions and no memory position embedding exists.
A sequence may start with `pad` tokens (associative retrieval in 3 or 4 segments, padded at the front to split
evenly): they are hidden from every query (and from later segments through the cache), so no output depends on
them; each pad row sees only itself, to keep its softmax defined (its output is never read).

Shapes: B batch, S segments, n segment_len, m num_mem_tokens, M cache length, d d_model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from rmt_bench.config import ModelConfig
from rmt_bench.models.backbone import Backbone
from rmt_bench.models.layers import KVBuffer


def build_backbone(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The own Transformer-XL backbone, or a wrapped Hugging Face model (`model.hf_name`, models/hf.py)."""
    if cfg.hf_name is None:
        return Backbone(cfg, vocab_size)
    from rmt_bench.models.hf import HFBackbone  # transformers only when asked for

    return HFBackbone(cfg, vocab_size)


@dataclass
class SegmentState:
    """What one segment hands to the next. `memory` None means the learned initial memory.

    The last two fields are evaluation settings that travel with a sequence (`RecurrentModel.initial_state`),
    so the model's config is never changed to evaluate differently from training."""

    memory: Tensor | None = None  # (B, m, d): next segment's read (and write) memory
    cache: list[Tensor] | None = None  # per layer (B, M, d), detached (Transformer-XL)
    pad: int = 0  # front-padding tokens still ahead in the sequence (hidden from attention)
    cache_hidden: tuple[int, ...] = ()  # cache columns that hold padding (hidden from attention)
    mem_len: int | None = None  # cache length kept (and same_length window); None: the model's mem_len
    reset_memory: bool = False  # the memory-reset control: every segment reads the initial memory, none written

    def detach(self) -> SegmentState:
        return dataclasses.replace(self, memory=None if self.memory is None else self.memory.detach())


@dataclass
class StreamState:
    """What one training batch hands to the next on a stream (language modelling): the state after its last
    segment and the BPTT history (the last `bptt_depth` segments' tokens with the state before each), from which
    the next batch's first segments recompute their gradient path. Fresh examples start from an empty one."""

    state: SegmentState | None = None
    history: list[tuple[Tensor, SegmentState]] = dataclasses.field(default_factory=list)


@lru_cache(maxsize=64)
def attention_mask(
    n: int,
    m: int,
    write: bool,
    cache_len: int,
    read_from_cache: bool,
    window: int,
    device: torch.device,
    cache_hidden: tuple[int, ...] = (),
    pad: int = 0,
    causal: bool = True,
) -> Tensor:
    """Additive mask (Q, K): 0 where attention is allowed, -inf elsewhere (Sec. 3, Fig. 1c).

    Rows/columns: [cache (c) ; read (m) ; tokens (n) ; write (m if write)], rows without the cache.
    Read rows see the read block (and the cache with `read_from_cache`); token rows see the cache, the read
    block and earlier tokens, never the write block; write rows see everything. `window` > 0 (Transformer-XL
    `same_length`) limits token rows to keys less than `window` positions back, memory excepted. The cache
    columns `cache_hidden` and the first `pad` token columns (front padding) are hidden from every row; a pad
    row sees only itself. `causal=False` (a wrapped encoder, `models/hf.py`): every row sees every column but
    the hidden ones.
    """
    c, mw = cache_len, m if write else 0
    q, k = m + n + mw, cache_len + m + n + mw
    allowed = torch.zeros(q, k, dtype=torch.bool)
    allowed[:m, c : c + m] = True
    allowed[:m, :c] = read_from_cache
    allowed[m : m + n, : c + m] = True
    allowed[m : m + n, c + m : c + m + n] = torch.ones(n, n, dtype=torch.bool).tril()
    if window > 0:
        dist = (torch.arange(q)[:, None] + c) - torch.arange(k)[None, :]
        is_memory_col = torch.zeros(k, dtype=torch.bool)
        is_memory_col[c : c + m] = True
        far = (dist >= window) & ~is_memory_col
        allowed[m : m + n] &= ~far[m : m + n]
    allowed[m + n :, :] = True
    if not causal:
        allowed[:] = True
    if cache_hidden or pad:
        allowed[:, list(cache_hidden)] = False
        allowed[:, c + m : c + m + pad] = False
        allowed[range(m, m + pad), range(c + m, c + m + pad)] = True
    bias = torch.zeros(q, k).masked_fill_(~allowed, float("-inf"))
    return bias.to(device)


class RecurrentModel(nn.Module):
    """Backbone + segment recurrence; the switches in `ModelConfig` make vanilla, memtr, xl, rmt, rmt_xl."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_front: int = 0):
        super().__init__()
        self.cfg = cfg
        self.pad_front = pad_front  # padding tokens at the front of every sequence of the task
        self.backbone = build_backbone(cfg, vocab_size)
        # an encoder (a wrapped BERT-like model) attends both ways and has no write block: the read rows'
        # outputs are the next memory (the follow-up's layout, models/hf.py)
        self.bidirectional = getattr(self.backbone, "bidirectional", False)
        m = cfg.num_mem_tokens
        # distinct initial slots (the public code's were identical), at the scale of the scaled embeddings
        self.memory = nn.Parameter(self._slots(m)) if m else None
        # optional: a learned per-slot vector added to the carried memory when it is read (not the paper's)
        self.read_memory_emb = nn.Parameter(self._slots(m)) if cfg.read_memory_emb else None

    def _slots(self, m: int) -> Tensor:
        """(m, d) random vectors at the scale of the token embeddings (own backbone: init_std x sqrt(d))."""
        if isinstance(self.backbone, Backbone):
            d = self.cfg.d_model
            return torch.randn(m, d) * self.cfg.init_std * math.sqrt(d)
        return torch.randn(m, self.backbone.d_model) * self.backbone.memory_scale

    def segment_rows(self, n: int) -> int:
        """Positions one segment of n tokens takes in the backbone (memory and a wrapped encoder's special tokens)."""
        m = self.cfg.num_mem_tokens
        write_block = m if self.cfg.recurrent_memory and not self.bidirectional else 0
        return m + n + write_block + getattr(self.backbone, "extra_rows", 0)

    @property
    def head(self):
        return self.backbone.head

    def initial_state(
        self, mem_len: int | None = None, reset_memory: bool = False, pad: int | None = None
    ) -> SegmentState:
        """The state before a sequence's first segment. Evaluation settings: `mem_len`, a Transformer-XL cache
        length other than the trained one (models without a cache ignore it); `reset_memory`, the control in
        which every segment reads the learned initial memory and nothing is carried by memory tokens (the write
        block, which the tokens never see, is left out). A model that stores the answer in its memory falls
        back to chance under it. `pad`: the sequence's front padding (None: the model's `pad_front`)."""
        kept = mem_len if mem_len is not None and self.cfg.mem_len else None
        pad = self.pad_front if pad is None else pad
        return SegmentState(pad=pad, mem_len=kept, reset_memory=reset_memory)

    def segment(
        self, tokens: Tensor, state: SegmentState, write: bool = True, capture: list | None = None
    ) -> tuple[Tensor, SegmentState]:
        """One segment. tokens (B, n) -> hidden states of the tokens (B, n, d), the state for the next one.

        write=False leaves out the write block (tokens never see it): the token outputs are the same, and the
        returned state is of no use. `capture` (inspection, rmt_bench/inspect.py): each layer's attention
        probabilities (B, H, Q, K) over [cache ; read ; tokens ; write] are appended to it.
        """
        m, n = self.cfg.num_mem_tokens, tokens.shape[1]
        write = write and self.writes(state)
        block = write and not self.bidirectional  # the write block's rows
        read = self._read_memory(state, tokens.shape[0])
        h = self.backbone.embed_tokens(tokens)  # (B, n, d)
        if m:
            h = torch.cat([read.to(h.dtype), h] + ([read.to(h.dtype)] if block else []), dim=1)  # (B, Q, d)
        mask = self._mask(n, block, state, tokens.device)
        out, layer_inputs = self.backbone(h, state.cache, mask, capture=capture)  # (B, Q, d)
        written = out[:, m + n :] if block else out[:, :m] if write else None  # encoder: the read rows' outputs
        return out[:, m : m + n], self._next_state(written, layer_inputs, state, n)

    def writes(self, state: SegmentState) -> bool:
        """Whether segments carry a write block (RMT's recurrent memory, unless the control resets it)."""
        return self.cfg.num_mem_tokens > 0 and self.cfg.recurrent_memory and not state.reset_memory

    def kept_cache(self, state: SegmentState) -> int:
        """The cache length per layer: the model's mem_len, or the evaluation's."""
        return self.cfg.mem_len if state.mem_len is None else state.mem_len

    def _read_memory(self, state: SegmentState, bsz: int) -> Tensor | None:
        """(B, m, d): the carried memory, or the learned initial memory on the first segment (and always for
        memtr); None without memory tokens."""
        if not self.cfg.num_mem_tokens:
            return None
        if state.memory is None or not self.cfg.recurrent_memory or state.reset_memory:
            return self.memory.expand(bsz, -1, -1)
        if self.read_memory_emb is not None:
            return state.memory + self.read_memory_emb.to(state.memory.dtype)
        return state.memory

    def _mask(self, n: int, write: bool, state: SegmentState, device: torch.device) -> Tensor:
        """The segment's attention mask (Q, K) over [cache ; read ; tokens ; write]."""
        cfg = self.cfg
        cache_len = state.cache[0].shape[1] if state.cache else 0
        window = self.kept_cache(state) if cfg.same_length else 0
        return attention_mask(
            n, cfg.num_mem_tokens, write, cache_len, cfg.read_mem_from_cache, window, device, state.cache_hidden,
            min(state.pad, n), not self.bidirectional,
        )  # fmt: skip

    def _next_state(
        self, written: Tensor | None, layer_inputs: list[Tensor], state: SegmentState, n: int
    ) -> SegmentState:
        """The final-layer write outputs become the next memory (Sec. 3); each layer's inputs over the segment
        extend its cache, cut to the last mem_len (Transformer-XL), detached. The segment's padding columns
        (after its m read rows) join the cache's hidden columns."""
        new_cache, hidden, seg_pad, kept = None, (), min(state.pad, n), self.kept_cache(state)
        if kept:
            old = state.cache or [x[:, :0] for x in layer_inputs]
            old_len, m = old[0].shape[1], self.cfg.num_mem_tokens
            new_cache = [torch.cat([c.to(x.dtype), x], 1)[:, -kept:].detach() for c, x in zip(old, layer_inputs)]
            start = old_len + layer_inputs[0].shape[1] - new_cache[0].shape[1]  # columns cut from the front
            columns = (*state.cache_hidden, *(old_len + m + i for i in range(seg_pad)))
            hidden = tuple(i - start for i in columns if i >= start)
        return dataclasses.replace(state, memory=written, cache=new_cache, pad=state.pad - seg_pad, cache_hidden=hidden)

    @torch.no_grad()
    def decode_segment(self, tokens: Tensor, state: SegmentState, answer: Tensor) -> tuple[Tensor, SegmentState]:
        """One segment decoded greedily with a key/value cache. tokens (B, n) are filled in place: where
        answer[b, t], the prediction at t becomes the input at t+1. -> token hidden states (B, n, d), next state.

        The prefix up to the first answer position runs as one block, then each position whose input comes
        from a prediction runs alone as one query against the keys and values of everything before it (per
        layer), and the rest of the segment as one block; the write block, last, reads the same keys and values
        (write rows see everything). Each block takes its rows of the segment's mask, so the result is the
        segment's own forward pass: `segment` on the filled tokens, without re-running it. A backbone without
        such buffers (a wrapped Hugging Face model) re-runs the segment for each generated token instead.
        """
        if not getattr(self.backbone, "incremental", True):
            return self._decode_by_rerun(tokens, state, answer)
        m, n = self.cfg.num_mem_tokens, tokens.shape[1]
        read = self._read_memory(state, tokens.shape[0])
        writes = self.writes(state)
        mask = self._mask(n, writes, state, tokens.device)  # (Q, K) of the whole segment
        c = mask.shape[1] - mask.shape[0]  # cache length
        steps = answer[:, :-1].any(0).nonzero().flatten().tolist()  # positions whose prediction is an input
        # blocks of token positions [lo, hi), each ending at such a position (its prediction fills the next
        # input) or at the segment's end: the prefix, then one position at a time through the answer, the rest
        bounds = sorted({0, n, *(t + 1 for t in steps)})
        hidden = []
        past = [KVBuffer(mask.shape[1]) for _ in self.backbone.layers]  # per layer, filled block by block
        layer_inputs = [[] for _ in self.backbone.layers]  # per layer, the input blocks (the XL cache's source)
        for lo, hi in zip(bounds, bounds[1:]):
            h = self.backbone.embed_tokens(tokens[:, lo:hi])  # (B, hi-lo, d)
            rows = slice(m + lo, m + hi)
            if lo == 0 and m:  # the read block goes with the first block of tokens
                h, rows = torch.cat([read.to(h.dtype), h], 1), slice(0, m + hi)
            out, inputs = self.backbone(h, state.cache if lo == 0 else None, mask[rows, : c + m + hi], past)
            for blocks, x in zip(layer_inputs, inputs):
                blocks.append(x)
            hidden.append(out[:, out.shape[1] - (hi - lo) :])
            t = hi - 1  # the last position of this block: its prediction may be the next input
            if t < n - 1 and bool(answer[:, t].any()):
                pred = self.head.logits(hidden[-1][:, -1]).argmax(-1)
                tokens[:, t + 1] = torch.where(answer[:, t], pred, tokens[:, t + 1])
        written = None
        if writes:
            written, inputs = self.backbone(read.to(hidden[0].dtype), None, mask[m + n :], past)
            for blocks, x in zip(layer_inputs, inputs):
                blocks.append(x)
        cache_source = [torch.cat(blocks, 1) for blocks in layer_inputs] if self.kept_cache(state) else []
        return torch.cat(hidden, 1), self._next_state(written, cache_source, state, n)

    def _decode_by_rerun(self, tokens: Tensor, state: SegmentState, answer: Tensor) -> tuple[Tensor, SegmentState]:
        """`decode_segment` by re-running the segment once per position whose prediction is the next input (the
        outputs up to t depend on the tokens up to t only), then once more for the state."""
        for t in answer[:, :-1].any(0).nonzero().flatten().tolist():
            hidden, _ = self.segment(tokens, state, write=False)
            pred = self.head.logits(hidden[:, t]).argmax(-1)
            tokens[:, t + 1] = torch.where(answer[:, t], pred, tokens[:, t + 1])
        return self.segment(tokens, state)

    def forward(
        self, inputs: Tensor, state: SegmentState | None = None, final_state: bool = True
    ) -> tuple[Tensor, SegmentState]:
        """inputs (B, S, n) -> hidden (B, S, n, d) and the final state; gradients through every segment.

        Models that carry nothing between segments (vanilla, memtr) run all segments as one batch.
        final_state=False: the caller discards the final state, so the last segment runs without its write
        block (its tokens never see it: the hidden states are the same) and the state returned is of no use.
        """
        bsz, n_seg, n = inputs.shape
        state = state or self.initial_state()
        if not self.cfg.carries_state and not state.pad:
            hidden, _ = self.segment(inputs.reshape(bsz * n_seg, n), SegmentState())
            return hidden.view(bsz, n_seg, n, -1), state
        outs = []
        for s in range(n_seg):
            hidden, state = self.segment(inputs[:, s], state, write=final_state or s < n_seg - 1)
            outs.append(hidden)
        return torch.stack(outs, dim=1), state


def train_segments(
    model: RecurrentModel,
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    norm: float,
    bptt_depth: int,
    state: SegmentState | None = None,
    history: list[tuple[Tensor, SegmentState]] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    final_state: bool = True,
    pad: int | None = None,
) -> tuple[float, SegmentState, list[tuple[Tensor, SegmentState]]]:
    """Teacher-forced forward and backward over one batch's segments; returns (loss, state, history).

    inputs, targets, weights (B, S, n). The loss is sum(weights * nll) / norm; backward is called here.
    bptt_depth = k >= 0 (Sec. 3, "BPTT-k"): the loss of segment s gets gradient through the memory of
    segments s-1 ... s-k exactly: those are recomputed from the state saved before s-k (from `history` when
    it reaches into earlier batches), never from the latest memory. -1 is one graph over the batch's
    segments (full BPTT over an example); a state carried in from an earlier batch is then detached.
    final_state=False (batches of fresh examples: nothing is carried to the next batch) spares the last
    segment's write block in one-graph training. `pad`: the front padding of fresh sequences (state None), if it
    is not the model's own (a curriculum stage of another length).
    """
    state, history = state or model.initial_state(pad=pad), list(history or [])
    n_seg = inputs.shape[1]
    recurrent = model.cfg.num_mem_tokens > 0 and model.cfg.recurrent_memory  # the XL cache carries no gradient
    if bptt_depth < 0 or not recurrent:
        with autocast():
            hidden, state = model(inputs, state, final_state)
            sel = weights > 0
            loss = model.head.loss(hidden[sel], targets[sel], weights[sel]) / norm
        loss.backward()
        return loss.item(), state.detach(), []
    total = 0.0
    for s in range(n_seg):
        tokens, w = inputs[:, s], weights[:, s]
        window = history[max(len(history) - bptt_depth, 0) :] if bptt_depth else []
        if not bool((w > 0).any()):
            with torch.no_grad(), autocast():
                _, new_state = model.segment(tokens, state)
        else:
            with autocast():
                st = window[0][1] if window else state
                for past_tokens, _ in window:
                    _, st = model.segment(past_tokens, st)
                hidden, new_state = model.segment(tokens, st)
                sel = w > 0
                loss = model.head.loss(hidden[sel], targets[:, s][sel], w[sel]) / norm
            loss.backward()
            total += loss.item()
        history.append((tokens, state))
        history = history[max(len(history) - bptt_depth, 0) :] if bptt_depth else []
        state = new_state.detach()
    return total, state, history


@torch.no_grad()
def generate_greedy(
    model: RecurrentModel, inputs: Tensor, answer: Tensor, state: SegmentState | None = None
) -> tuple[Tensor, Tensor]:
    """Greedy decoding across segments, carrying the state (the paper's metric, no teacher forcing).

    inputs, answer (B, S, n): where answer[b, s, t] is set, the prediction at t becomes the input at t+1
    (the next segment's first input after a segment's last position). Segments with answers are decoded with a
    key/value cache (`RecurrentModel.decode_segment`): one query position per generated token.
    -> predictions (B, S, n) and the inputs actually used (B, S, n).
    """
    inputs, answer = inputs.clone(), answer.bool()
    n_seg = inputs.shape[1]
    preds = torch.empty_like(inputs)
    state = state or model.initial_state()
    for s in range(n_seg):
        tokens = inputs[:, s]  # a view: filled in place
        if s > 0:
            tokens[:, 0] = torch.where(answer[:, s - 1, -1], preds[:, s - 1, -1], tokens[:, 0])
        if bool(answer[:, s, :-1].any()):
            hidden, state = model.decode_segment(tokens, state, answer[:, s])
        else:
            hidden, state = model.segment(tokens, state)
        preds[:, s] = model.head.logits(hidden).argmax(-1)
    return preds, inputs
