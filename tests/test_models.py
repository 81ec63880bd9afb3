"""Equivalence tests: the models are what they claim (DESIGN.md, invariants)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rmt_bench.models import SegmentState, build_model, generate_greedy, train_segments
from rmt_bench.models.layers import RelMultiHeadAttention, SinusoidalDistances, gather_relative, relative_distances
from rmt_bench.models.recurrence import attention_mask
from tests.helpers import VOCAB, copy_weights, tiny_model, tokens


@pytest.mark.parametrize(("q", "k"), [(5, 9), (5, 5), (1, 1), (1, 4), (2, 2)])
def test_gather_relative_matches_naive_signed_distances(q, k):
    """Every (i, j) picks the column of its own signed distance i - j + (K - Q), ahead of the query too."""
    b, h = 2, 3
    p = k + q - 1
    scores = torch.randn(b, h, q, p)
    picked = gather_relative(scores, k)
    dist = relative_distances(q, k, clamp_len=-1)
    for i in range(q):
        for j in range(k):
            d = (k - q + i) - j
            col = int((dist == d).nonzero()[0, 0])
            assert_close(picked[:, :, i, j], scores[:, :, i, col])
    assert bool((dist > 0).any()) == (k > 1) and bool((dist < 0).any()) == (q > 1)


def test_relative_attention_equals_per_pair_computation():
    """score(i, j) = (q_i+u).k_j + (q_i+v).W_r r(i-j), computed naively pair by pair, for signed distances."""
    torch.manual_seed(0)
    d, h, dh, q, mlen = 16, 2, 8, 4, 3
    attn = RelMultiHeadAttention(d, h, dh, 0.0, 0.0).eval()
    x, cache = torch.randn(1, q, d), torch.randn(1, mlen, d)
    ctx = torch.cat([cache, x], 1)
    k = ctx.shape[1]
    u, v = torch.randn(h, dh), torch.randn(h, dh)
    emb = SinusoidalDistances(d)
    pos_emb = emb(relative_distances(q, k, -1))
    mask = torch.zeros(q, k)  # no mask at all: queries also attend ahead (negative distances)
    out = attn(*attn.project(x, cache, u), pos_emb, u, v, mask)

    qv = attn.q_net(x).view(q, h, dh)
    kk, vv = attn.kv_net(ctx).view(k, 2, h, dh).unbind(1)
    naive = torch.zeros(q, h, dh)
    for head in range(h):
        scores = torch.zeros(q, k)
        for i in range(q):
            for j in range(k):
                r = attn.r_net(emb(torch.tensor([float(mlen + i - j)]))).view(h, dh)[head]
                scores[i, j] = (qv[i, head] + u[head]) @ kk[j, head] + (qv[i, head] + v[head]) @ r
        naive[:, head] = torch.softmax(scores / dh**0.5, -1) @ vv[:, head]
    assert_close(out[0], attn.o_net(naive.reshape(q, h * dh)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(mem_len=3), dict(pre_lnorm=True)], ids=["rmt", "rmt_xl", "pre_ln"])
def test_dropping_the_last_write_block_changes_no_loss_or_gradient(kw):
    """final_state=False (nothing carried to the next batch) leaves out the last segment's write block: the loss
    and every gradient equal the full pass's; the write block really is gone (its memory is not returned)."""
    name = "rmt_xl" if "mem_len" in kw else "rmt"
    model = build_model(tiny_model(name, **kw), VOCAB)
    x = tokens(s=3)
    w = torch.rand(x.shape)
    results = []
    for final_state in (True, False):
        model.zero_grad()
        loss, state, _ = train_segments(model, x, x, w, w.sum().item(), -1, final_state=final_state)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()}, state))
    (full, grads, state), (lean, lean_grads, lean_state) = results
    assert lean == pytest.approx(full, rel=1e-6) and state.memory is not None and lean_state.memory is None
    for k in grads:
        assert_close(lean_grads[k], grads[k], atol=1e-6, rtol=1e-5)


def test_attention_mask_follows_the_paper():
    m, n = 2, 3
    allowed = attention_mask(n, m, True, 0, False, 0, torch.device("cpu")) == 0
    read, tok, write = slice(0, m), slice(m, m + n), slice(m + n, 2 * m + n)
    assert allowed[read, read].all() and not allowed[read, tok].any() and not allowed[read, write].any()
    assert allowed[tok, read].all() and not allowed[tok, write].any()
    assert torch.equal(allowed[tok, tok], torch.ones(n, n, dtype=torch.bool).tril())
    assert allowed[write].all()


def test_rmt_with_zero_memory_tokens_equals_vanilla():
    rmt = build_model(tiny_model("rmt", num_mem_tokens=0), VOCAB).eval()
    vanilla = build_model(tiny_model("vanilla"), VOCAB).eval()
    copy_weights(rmt, vanilla)
    x = tokens()
    assert_close(rmt(x)[0], vanilla(x)[0])


def test_stateless_models_fold_segments_into_the_batch_exactly():
    model = build_model(tiny_model("vanilla"), VOCAB).eval()
    x = tokens()
    folded, _ = model(x)
    looped = torch.stack([model.segment(x[:, s], SegmentState())[0] for s in range(x.shape[1])], 1)
    assert_close(folded, looped)


def test_the_last_segment_sees_its_history_only_through_the_carried_memory():
    """Same last segment, different histories: each output equals one `segment` pass from the memory its own
    history wrote, the memory-reset control equals a pass from the initial memory, and vanilla ignores history."""
    model = build_model(tiny_model("rmt"), VOCAB).eval()
    x, y = tokens(seed=1), tokens(seed=2)
    y[:, -1] = x[:, -1]
    with torch.no_grad():
        for seq in (x, y):
            _, state = model(seq[:, :-1])
            assert_close(model(seq)[0][:, -1], model.segment(seq[:, -1], state)[0], atol=1e-6, rtol=1e-6)
            reset = model(seq, model.initial_state(reset_memory=True))[0][:, -1]
            fresh = model.segment(seq[:, -1], SegmentState())[0]  # the learned initial memory
            assert_close(reset, fresh, atol=1e-6, rtol=1e-6)
        assert (model(x)[0][:, -1] - model(y)[0][:, -1]).abs().max() > 1e-4  # the histories' memories differ
    vanilla = build_model(tiny_model("vanilla"), VOCAB).eval()
    assert_close(vanilla(x)[0][:, -1], vanilla(y)[0][:, -1])


def test_memory_slots_start_distinct():
    model = build_model(tiny_model("rmt", num_mem_tokens=4), VOCAB)
    assert torch.cdist(model.memory, model.memory).add(torch.eye(4)).min() > 0


def last_segment_loss_grad(model, bptt_depth, n_seg=3):
    x = tokens(s=n_seg)
    weights = torch.zeros(x.shape)
    weights[:, -1] = 1.0
    model.zero_grad()
    train_segments(model, x, x, weights, weights.sum().item(), bptt_depth)
    return model.memory.grad


def test_gradient_reaches_first_memory_iff_bptt_depth_covers_it():
    """Loss on segment 3 only: the initial memory (read by segment 1) is 2 segments back."""
    model = build_model(tiny_model("rmt"), VOCAB)
    for depth, reaches in [(0, False), (1, False), (2, True), (-1, True)]:
        grad = last_segment_loss_grad(model, depth)
        got = grad is not None and grad.abs().sum() > 0
        assert got == reaches, f"bptt_depth={depth}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.layers.parameters())


def test_truncated_bptt_with_full_depth_equals_one_graph():
    """The windowed recomputation (BPTT-k) gives exactly the one-graph gradient when k covers the batch."""
    model = build_model(tiny_model("rmt"), VOCAB)
    x = tokens(s=4)
    weights = torch.rand(x.shape)
    mem0 = model.memory.detach().expand(x.shape[0], -1, -1).clone()
    grads = []
    for depth in (-1, 3):
        model.zero_grad()
        start = mem0.clone().requires_grad_()
        loss, _, _ = train_segments(model, x, x, weights, 10.0, depth, state=SegmentState(memory=start))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None] + [start.grad, loss])
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_history_carries_bptt_into_the_next_batch():
    """A state carried from an earlier batch keeps its gradient path through `history` (the LM case)."""
    model = build_model(tiny_model("rmt"), VOCAB)
    x = tokens(s=2)
    w = torch.ones(x.shape)
    _, state, history = train_segments(model, x, x, w, 1.0, bptt_depth=1)
    assert len(history) == 1 and state.memory is not None and not state.memory.requires_grad
    model.zero_grad()
    weights = torch.zeros(x.shape)
    weights[:, 0] = 1.0
    train_segments(model, x, x, weights, 1.0, bptt_depth=1, state=state, history=history)
    assert model.memory.grad is None  # 2 segments back: cut
    model.zero_grad()
    _, state, history = train_segments(model, x[:, :1], x[:, :1], w[:, :1], 1.0, bptt_depth=2)
    train_segments(model, x, x, weights, 1.0, bptt_depth=2, state=state, history=history)
    assert model.memory.grad is not None and model.memory.grad.abs().sum() > 0  # 1 segment back: reached


@pytest.mark.parametrize("name", ["vanilla", "memtr", "xl", "rmt", "rmt_xl"])
def test_greedy_generation_matches_teacher_forced_argmax(name):
    """Re-scoring the greedy inputs teacher-forced gives the greedy predictions everywhere."""
    model = build_model(tiny_model(name, dropout=0.1), VOCAB).eval()
    x = tokens(b=4, s=3, n=4)
    answer = torch.zeros(x.shape, dtype=torch.bool)
    answer.view(4, -1)[:, 5:] = True  # the answer starts inside segment 2 and runs across segment 3
    preds, used = generate_greedy(model, x, answer)
    flat_used, flat_preds, flat_ans = used.view(4, -1), preds.view(4, -1), answer.view(4, -1)
    assert torch.equal(flat_used[:, 1:][flat_ans[:, :-1]], flat_preds[:, :-1][flat_ans[:, :-1]])
    assert torch.equal(flat_used[:, :6], x.view(4, -1)[:, :6])  # inputs before the answer are untouched
    hidden, _ = model(used)
    assert torch.equal(model.head.logits(hidden).argmax(-1), preds)


@torch.no_grad()
def prefix_rerun_greedy(model, inputs, answer):
    """The reference decoder (the project's first): for every answer position, re-run the segment's prefix
    filled so far, without the write block; then the whole segment once to carry the state."""
    inputs, answer = inputs.clone(), answer.bool()
    preds, state = torch.empty_like(inputs), model.initial_state()
    for s in range(inputs.shape[1]):
        tok = inputs[:, s]
        if s > 0:
            tok[:, 0] = torch.where(answer[:, s - 1, -1], preds[:, s - 1, -1], tok[:, 0])
        for t in range(inputs.shape[2] - 1):
            if bool(answer[:, s, t].any()):
                hidden, _ = model.segment(tok[:, : t + 1], state, write=False)
                tok[:, t + 1] = torch.where(answer[:, s, t], model.head.logits(hidden[:, t]).argmax(-1), tok[:, t + 1])
        hidden, state = model.segment(tok, state)
        preds[:, s] = model.head.logits(hidden).argmax(-1)
    return preds, inputs


CACHED_DECODING_MODELS = [
    ("vanilla", {}),
    ("memtr", {}),
    ("xl", {}),
    ("xl", {"same_length": True, "clamp_len": 3}),
    ("rmt", {}),
    ("rmt", {"pre_lnorm": True}),
    ("rmt_xl", {"read_mem_from_cache": True}),
]


@pytest.mark.parametrize("pad", [0, 2, 8], ids=lambda p: f"pad{p}")
@pytest.mark.parametrize(("name", "switches"), CACHED_DECODING_MODELS, ids=lambda x: str(x))
def test_cached_greedy_decoding_equals_prefix_reruns(name, switches, pad):
    """Key/value-cached decoding gives the prefix re-run's predictions and inputs, and each decoded segment's
    hidden states and carried state equal one forward pass of `segment` on its filled tokens (1e-5, fp32).
    Answers of different lengths per example, crossing segment borders, plus a lone answer position; with
    front padding inside the first segment and across it."""
    torch.manual_seed(0)
    model = build_model(tiny_model(name, **switches), VOCAB, pad_front=pad).eval()
    x = tokens(b=5, s=3, n=6, seed=3)
    answer = torch.zeros(x.shape, dtype=torch.bool)
    flat = answer.view(5, -1)
    for b in range(5):
        flat[b, 4 + b :] = True  # starts in segment 1 (b < 2) or 2, runs across the border into segment 3
    answer[0, 0, 1] = True  # a lone position early on
    preds, used = generate_greedy(model, x, answer)
    ref_preds, ref_used = prefix_rerun_greedy(model, x, answer)
    assert torch.equal(used, ref_used) and torch.equal(preds, ref_preds)
    state = ref_state = model.initial_state()
    for s in range(3):
        hidden, state = model.decode_segment(used[:, s].clone(), state, answer[:, s])
        ref_hidden, ref_state = model.segment(used[:, s], ref_state)
        assert_close(model.head.logits(hidden), model.head.logits(ref_hidden), atol=1e-5, rtol=1e-5)
        for got, ref in ((state.memory, ref_state.memory), *zip(state.cache or [], ref_state.cache or [])):
            assert_close(got, ref, atol=1e-5, rtol=1e-5)


PADDED_MODELS = [*CACHED_DECODING_MODELS, ("rmt_xl", {"mem_len": 7})]


@pytest.mark.parametrize(("segments", "n", "pad"), [(3, 4, 2), (4, 3, 2), (7, 2, 4)])
@pytest.mark.parametrize(("name", "switches"), PADDED_MODELS, ids=lambda x: str(x))
def test_front_padding_is_hidden_from_every_output(name, switches, segments, n, pad):
    """Retrieval in 3 / 4 / 7 segments pads the front: whatever the padding tokens are, no output at a real
    position changes (teacher-forced, through memory and cache, and greedy), so the padding is out of attention.
    Without the mask the same change does reach the outputs of every model that carries state."""
    torch.manual_seed(0)
    model = build_model(tiny_model(name, **switches), VOCAB, pad_front=pad).eval()
    x = tokens(b=4, s=segments, n=n, seed=5)
    y = x.clone()
    y.view(4, -1)[:, :pad] = torch.randint(2, VOCAB, (4, pad), generator=torch.Generator().manual_seed(9))
    real = torch.ones(segments * n, dtype=torch.bool)
    real[:pad] = False
    with torch.no_grad():
        hx, _ = model(x)
        hy, _ = model(y)
    assert_close(hx.flatten(1, 2)[:, real], hy.flatten(1, 2)[:, real], atol=1e-6, rtol=1e-6)
    answer = torch.zeros(x.shape, dtype=torch.bool)
    answer.view(4, -1)[:, -n - 1 :] = True  # the answer crosses into the last segment
    px, py = (generate_greedy(model, z, answer)[0].flatten(1) for z in (x, y))
    assert torch.equal(px[:, real], py[:, real])
    if model.cfg.carries_state:
        model.pad_front = 0
        with torch.no_grad():
            seen = (model(x)[0] - model(y)[0]).flatten(1, 2)[:, real].abs().max()
        assert seen > 1e-4


def test_a_padded_segment_equals_the_unpadded_one_for_vanilla():
    """Relative positions: the 10 real tokens after 2 hidden pads give the outputs of the 10 tokens alone."""
    torch.manual_seed(0)
    padded = build_model(tiny_model("vanilla"), VOCAB, pad_front=2).eval()
    plain = build_model(tiny_model("vanilla"), VOCAB).eval()
    plain.load_state_dict(padded.state_dict())
    x = tokens(b=3, s=1, n=10, seed=2)
    with torch.no_grad():
        hp, _ = padded(torch.cat([torch.zeros(3, 1, 2, dtype=torch.long), x], 2))
        h, _ = plain(x)
    assert_close(hp[:, :, 2:], h, atol=1e-6, rtol=1e-6)


def test_read_memory_emb_is_added_to_the_carried_memory_only():
    """model.read_memory_emb (lucidrains' per-slot read embedding): zero, it is the plain model; it never touches the
    first segment (which reads the learned initial memory) and changes what later segments read; it trains."""
    torch.manual_seed(0)
    with_emb = build_model(tiny_model("rmt", read_memory_emb=True), VOCAB).eval()
    plain = build_model(tiny_model("rmt"), VOCAB).eval()
    plain.load_state_dict({k: v for k, v in with_emb.state_dict().items() if k != "read_memory_emb"})
    x = tokens(b=3, s=3, n=4, seed=1)
    with torch.no_grad():
        h_emb, _ = with_emb(x)
        h_plain, _ = plain(x)
        assert_close(h_emb[:, 0], h_plain[:, 0], atol=1e-6, rtol=1e-6)
        assert (h_emb[:, 1:] - h_plain[:, 1:]).abs().max() > 1e-3
        with_emb.read_memory_emb.zero_()
        assert_close(with_emb(x)[0], h_plain, atol=1e-6, rtol=1e-6)
    with_emb.train()
    hidden, _ = with_emb(x)
    hidden[:, -1].sum().backward()
    assert with_emb.read_memory_emb.grad.abs().sum() > 0
