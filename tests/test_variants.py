"""Transformer-XL, RMT+XL and MemTr are switches on the same backbone and loop: equivalence tests."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rmt_bench.models import SegmentState, build_model, train_segments
from tests.helpers import VOCAB, copy_weights, tiny_model, tokens


def window_mask(total: int, seg: int, mem_len: int, same_length: bool) -> torch.Tensor:
    """One pass over the whole sequence: token g sees keys from its segment's start minus mem_len up to g
    (with same_length: exactly the mem_len keys up to g)."""
    g = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    low = (g // seg * seg - mem_len).clamp(min=0)
    allowed = (j <= g) & (j >= low)
    if same_length:
        allowed &= g - j < mem_len
    return torch.zeros(total, total).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("n_seg", [1, 2, 4])
@pytest.mark.parametrize("mem_len", [3, 5, 9])  # shorter than, equal to, longer than the segment (5)
def test_xl_over_segments_equals_one_pass_with_a_window_mask(n_seg, mem_len):
    model = build_model(tiny_model("xl", mem_len=mem_len), VOCAB).eval()
    x = tokens(b=2, s=n_seg, n=5)
    hidden, state = model(x)
    flat = x.reshape(2, -1)
    one_pass, _ = model.backbone(model.backbone.embed_tokens(flat), None, window_mask(flat.shape[1], 5, mem_len, False))
    assert_close(hidden.reshape(2, -1, hidden.shape[-1]), one_pass, atol=1e-5, rtol=1e-4)
    assert state.cache[0].shape[1] == min(mem_len, 5 * n_seg)


def test_xl_same_length_equals_a_sliding_window():
    model = build_model(tiny_model("xl", mem_len=4, same_length=True), VOCAB).eval()
    x = tokens(b=2, s=3, n=5)
    hidden, _ = model(x)
    flat = x.reshape(2, -1)
    one_pass, _ = model.backbone(model.backbone.embed_tokens(flat), None, window_mask(15, 5, 4, True))
    assert_close(hidden.reshape(2, 15, -1), one_pass, atol=1e-5, rtol=1e-4)


class ClampedDistances(torch.nn.Module):
    """The reference for clamp_len: the unclamped model's distance embedding, fed explicitly clamped distances."""

    def __init__(self, inner: torch.nn.Module, clamp_len: int):
        super().__init__()
        self.inner, self.clamp_len = inner, clamp_len

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        assert d.abs().max() > self.clamp_len  # the test would prove nothing otherwise
        return self.inner(d.clamp(-self.clamp_len, self.clamp_len))


def test_xl_clamp_len_equals_explicitly_clamped_distances():
    """clamp_len=2 == the unclamped model whose distance embedding sees min(max(d, -2), 2) (Transformer-XL)."""
    from rmt_bench.models.layers import relative_distances

    assert relative_distances(3, 6, 2).tolist() == [2, 2, 2, 2, 1, 0, -1, -2]  # K-1 ... 1-Q, clamped to [-2, 2]
    ref = build_model(tiny_model("xl", mem_len=8), VOCAB).eval()
    clamped = build_model(tiny_model("xl", mem_len=8, clamp_len=2), VOCAB).eval()
    clamped.load_state_dict(ref.state_dict())
    ref.backbone.distances = ClampedDistances(ref.backbone.distances, 2)
    x = tokens(b=2, s=2, n=5)
    assert_close(clamped(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)


def test_xl_cache_carries_no_gradient():
    model = build_model(tiny_model("xl"), VOCAB)
    x = tokens(s=3)
    hidden, state = model(x)
    assert all(not c.requires_grad for c in state.cache)
    # the loss of the last segment does not reach the first segment's inputs through the cache
    emb = model.backbone.embed
    emb.weight.grad = None
    x2 = x.clone()
    x2[:, 0] = 0  # token 0 is used only in segment 1
    hidden, _ = model(x2)
    hidden[:, -1].sum().backward()
    assert emb.weight.grad[0].abs().sum() == 0


def test_rmt_xl_with_empty_cache_equals_rmt():
    rmt = build_model(tiny_model("rmt"), VOCAB).eval()
    rmt_xl = build_model(tiny_model("rmt_xl", mem_len=0), VOCAB).eval()
    rmt_xl.load_state_dict(rmt.state_dict())
    x = tokens()
    assert_close(rmt(x)[0], rmt_xl(x)[0])


def test_rmt_xl_cache_holds_memory_token_states_and_changes_the_output():
    rmt = build_model(tiny_model("rmt"), VOCAB).eval()
    rmt_xl = build_model(tiny_model("rmt_xl", mem_len=20), VOCAB).eval()
    rmt_xl.load_state_dict(rmt.state_dict())
    x = tokens(s=2, n=4)
    hidden, state = rmt_xl(x)
    m = rmt_xl.cfg.num_mem_tokens
    assert state.cache[0].shape[1] == 2 * (4 + 2 * m)  # [read ; tokens ; write] of both segments
    assert_close(hidden[:, 0], rmt(x)[0][:, 0])  # first segment: nothing cached yet
    assert not torch.allclose(hidden[:, 1], rmt(x)[0][:, 1])


def test_read_mem_from_cache_opens_exactly_the_read_rows_to_the_cache():
    """The mask read back: read rows see the cache columns only with the switch, every other entry is the same;
    and the switched model equals the plain one whose segments get that mask."""
    from rmt_bench.models.recurrence import attention_mask

    m, n, c = 2, 3, 4
    on, off = (attention_mask(n, m, True, c, flag, 0, torch.device("cpu")) == 0 for flag in (True, False))
    assert on[:m, :c].all() and not off[:m, :c].any()
    assert torch.equal(on[m:], off[m:]) and torch.equal(on[:m, c:], off[:m, c:])
    plain = build_model(tiny_model("rmt_xl", mem_len=8), VOCAB).eval()
    switched = build_model(tiny_model("rmt_xl", mem_len=8, read_mem_from_cache=True), VOCAB).eval()
    switched.load_state_dict(plain.state_dict())
    x = tokens(s=3, n=4)
    ref = plain._mask
    plain._mask = lambda n, write, state, device: attention_mask(
        n, 3, write, state.cache[0].shape[1] if state.cache else 0, True, 0, device
    )
    assert_close(switched(x)[0], plain(x)[0], atol=1e-6, rtol=1e-6)
    plain._mask = ref
    assert (switched(x)[0][:, 1:] - plain(x)[0][:, 1:]).abs().max() > 1e-6  # and the cache does reach memory


def test_rmt_xl_gradient_reaches_earlier_segments_through_memory():
    model = build_model(tiny_model("rmt_xl"), VOCAB)
    x = tokens(s=3)
    weights = torch.zeros(x.shape)
    weights[:, -1] = 1.0
    train_segments(model, x, x, weights, 1.0, bptt_depth=-1)
    assert model.memory.grad is not None and model.memory.grad.abs().sum() > 0


def test_memtr_equals_rmt_on_one_segment():
    rmt = build_model(tiny_model("rmt"), VOCAB).eval()
    memtr = build_model(tiny_model("memtr"), VOCAB).eval()
    memtr.load_state_dict(rmt.state_dict())
    x = tokens(s=1)
    assert_close(rmt(x)[0], memtr(x)[0])


def test_memtr_carries_nothing_between_segments():
    model = build_model(tiny_model("memtr"), VOCAB).eval()
    x, y = tokens(seed=1), tokens(seed=2)
    y[:, -1] = x[:, -1]
    assert_close(model(x)[0][:, -1], model(y)[0][:, -1])
    folded, _ = model(x)
    looped = torch.stack([model.segment(x[:, s], SegmentState())[0] for s in range(3)], 1)
    assert_close(folded, looped)


def test_vanilla_and_xl_share_weights_names():
    """Variants are switches on the same modules: identical parameter names, only `memory` added."""
    names = {n: set(build_model(tiny_model(n), VOCAB).state_dict()) for n in ("vanilla", "xl", "rmt", "rmt_xl")}
    assert names["vanilla"] == names["xl"]
    assert names["rmt"] == names["rmt_xl"] == names["vanilla"] | {"memory"}
    copy_weights(build_model(tiny_model("rmt"), VOCAB), build_model(tiny_model("xl"), VOCAB))
