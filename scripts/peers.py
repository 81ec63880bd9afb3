"""Side by side with the public implementations, at equal size: `python scripts/bench.py peers`.

Our rmt against lucidrains' recurrent-memory-transformer-pytorch, our vanilla and xl against x-transformers'
TransformerWrapper. Equal size: the same vocabulary, depth, d_model, heads x head size, feed-forward parameters,
segment, memory and batch. The peers' feed-forward is their own: x-transformers' GELU MLP of width d_inner
(`ff_mult = d_inner / d_model`, ours exactly), lucidrains' GEGLU, whose hidden width is 2/3 of
`ff_mult * dim` so that the same `ff_mult` gives the same parameter count (2 * d * d_inner, within rounding).

Every model trains full BPTT over the same batches (dropout 0, AdamW `--lr` 1e-3, `--precision` fp32 or bf16
autocast for all, the same threads) on a copy/reverse sequence whose source tokens follow a Zipf law, so that
the loss falls within the timed steps; the loss is the cross-entropy of the answer half. Ours drops the last
segment's write block, as `rmt-bench` does on tasks whose batches carry nothing over (the peer's loop cannot).
Tokens are the input tokens of a step (batch x segments x segment_len), counted the same for all. Timing
alternates rounds between the models in one process; the peak memory of each model is measured in a process
of its own (`--memory-of`). The peers are the optional extra `.[bench]`, never imported by the package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmt_bench.config import ModelConfig
from rmt_bench.models import build_model, train_segments

# The two configs of issue 8's table. `reverse`: the paper's reverse model (App. A) on reverse-24 in 4 segments.
CONFIGS = {
    "reverse": dict(
        task="reverse", vocab=12, n_layer=4, d_model=128, n_head=4, d_head=64, d_inner=256,
        segment_len=12, segments=4, mem=6, batch=64,
    ),
    "wide": dict(
        task="copy", vocab=64, n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512,
        segment_len=64, segments=4, mem=8, batch=32,
    ),
}  # fmt: skip
MODELS = ["rmt", "rmt-peer", "vanilla", "vanilla-peer", "xl", "xl-peer"]
PEER_PACKAGES = ("recurrent-memory-transformer-pytorch", "x-transformers")  # the `bench` extra


def make_batches(cfg: dict, count: int, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`count` batches of (inputs, targets, weights), each (B, S * n): [source ; answer], the answer the source
    copied or reversed; targets are the next tokens, weights 1 where the target is an answer token."""
    gen = torch.Generator().manual_seed(seed)
    total = cfg["segments"] * cfg["segment_len"]
    half = total // 2
    zipf = 1.0 / torch.arange(1, cfg["vocab"] - 1, dtype=torch.float)  # tokens 2..V-1; 0 and 1 unused
    out = []
    for _ in range(count):
        src = torch.multinomial(zipf.expand(cfg["batch"], -1), half, replacement=True, generator=gen) + 2
        answer = src.flip(1) if cfg["task"] == "reverse" else src
        seq = torch.cat([src, answer], 1)  # (B, total)
        targets = torch.cat([seq[:, 1:], torch.zeros_like(seq[:, :1])], 1)
        weights = torch.zeros(seq.shape)
        weights[:, half - 1 : total - 1] = 1.0
        out.append((seq, targets, weights))
    return out


def masked_ce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Sum of the answer tokens' cross-entropy / their count; logits (B, T, V)."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * weights.flatten()).sum() / weights.sum()


@dataclass
class Contender:
    name: str
    module: nn.Module
    options: dict  # every non-default option given to a peer (ours: the model config)
    step_loss: callable  # (inputs, targets, weights) -> loss tensor after backward

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def ours(name: str, cfg: dict, arch: str) -> Contender:
    mem = cfg["mem"]
    kw = dict(num_mem_tokens=mem) if name == "rmt" else dict(mem_len=mem) if name == "xl" else {}
    pre = arch == "trainable"
    model_cfg = ModelConfig(
        name=name, arch=arch, pre_lnorm=pre, init_std=(2 / (5 * cfg["d_model"])) ** 0.5 if pre else 0.02,
        n_layer=cfg["n_layer"], d_model=cfg["d_model"], n_head=cfg["n_head"], d_head=cfg["d_head"],
        d_inner=cfg["d_inner"], dropout=0.0, **kw,
    )  # fmt: skip
    model = build_model(model_cfg, cfg["vocab"])
    shape = (cfg["batch"], cfg["segments"], cfg["segment_len"])

    def step(inputs: Tensor, targets: Tensor, weights: Tensor) -> float:
        x, y, w = inputs.view(shape), targets.view(shape), weights.view(shape)
        return train_segments(model, x, y, w, w.sum().item(), -1, final_state=False)[0]  # full BPTT, backward inside

    label = name if arch == "trainable" else f"{name} (post-LN)"
    return Contender(label, model, {"arch": arch, **kw}, step)


def rmt_peer(cfg: dict) -> Contender:
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer

    options = dict(
        num_memory_tokens=cfg["mem"], seq_len=cfg["segment_len"], dim_head=cfg["d_head"], heads=cfg["n_head"],
        ff_mult=cfg["d_inner"] / cfg["d_model"], use_xl_memories=False, num_residual_streams=1,
    )  # fmt: skip
    model = RecurrentMemoryTransformer(cfg["d_model"], num_tokens=cfg["vocab"], depth=cfg["n_layer"], **options)
    n = cfg["segment_len"]

    def step(inputs: Tensor, targets: Tensor, weights: Tensor) -> float:
        # RecurrentMemoryTransformerWrapper's segment loop (full BPTT), with the loss on the answer tokens only:
        # its own loss is a mean per segment, undefined for segments without answer tokens
        memories, logits = None, []
        for segment in inputs.split(n, dim=1):
            out, memories, _ = model(segment, memories)
            logits.append(out)
        loss = masked_ce(torch.cat(logits, 1), targets, weights)
        loss.backward()
        return loss.item()

    return Contender("rmt-peer", model, options, step)


def xt_peer(name: str, cfg: dict) -> Contender:
    from x_transformers import Decoder, TransformerWrapper

    layers = dict(heads=cfg["n_head"], attn_dim_head=cfg["d_head"], ff_mult=cfg["d_inner"] / cfg["d_model"])
    wrapper = dict(max_seq_len=cfg["segment_len"])
    if name == "xl":  # Transformer-XL recurrence as x-transformers' README has it: a cache and relative positions
        wrapper["max_mem_len"] = cfg["mem"]
        layers["rel_pos_bias"] = True
    model = TransformerWrapper(
        num_tokens=cfg["vocab"], attn_layers=Decoder(dim=cfg["d_model"], depth=cfg["n_layer"], **layers), **wrapper
    )
    b, s, n = cfg["batch"], cfg["segments"], cfg["segment_len"]

    def step(inputs: Tensor, targets: Tensor, weights: Tensor) -> float:
        if name == "vanilla":  # segments are independent: one batch of B * S segments, as ours
            logits = model(inputs.reshape(b * s, n)).view(b, s * n, -1)
        else:
            mems, outs = None, []
            for segment in inputs.split(n, dim=1):
                out, mems = model(segment, mems=mems, return_mems=True)
                outs.append(out)
            logits = torch.cat(outs, 1)
        loss = masked_ce(logits, targets, weights)
        loss.backward()
        return loss.item()

    return Contender(f"{name}-peer", model, {**wrapper, **layers}, step)


def build(name: str, cfg: dict, arch: str = "trainable", precision: str = "fp32") -> Contender:
    """The contender, its step run in bf16 autocast (the same for all) when precision is bf16."""
    torch.manual_seed(0)
    if name == "rmt-peer":
        c = rmt_peer(cfg)
    elif name.endswith("-peer"):
        c = xt_peer(name.removesuffix("-peer"), cfg)
    else:
        c = ours(name, cfg, arch)
    if precision == "bf16":
        step = c.step_loss

        def step_bf16(*batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step(*batch)

        c.step_loss = step_bf16
    return c


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. Not ru_maxrss: a child started by fork + exec
    inherits its parent's high-water mark there, while VmHWM starts afresh with the new program."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def train_steps(c: Contender, opt: torch.optim.Optimizer, batches: list, steps: int, start: int) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        losses.append(c.step_loss(*batches[i % len(batches)]))
        opt.step()
    return losses


def memory_of(args) -> None:
    """In a process of its own: RSS after building the model, and the peak over a few training steps."""
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.configs[0]] | ({"batch": args.batch} if args.batch else {})
    name, _, arch = args.memory_of.partition(":")
    c = build(name, cfg, arch or "trainable", args.precision)
    opt = torch.optim.AdamW(c.module.parameters(), lr=args.lr)
    batches = make_batches(cfg, 4)
    before = status_mb("VmRSS")
    train_steps(c, opt, batches, 4, 0)
    peak = status_mb("VmHWM")
    print(json.dumps({"before": before, "peak": peak}))


def bench_peers(args) -> None:
    if args.memory_of:
        return memory_of(args)
    torch.set_num_threads(args.threads)
    versions = {p: version(p) for p in ("torch", *PEER_PACKAGES)}
    print("versions: " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    threads = torch.get_num_threads()
    print(f"{cpu}, {threads} threads, {args.precision} for all, dropout 0, AdamW lr {args.lr:g}, full BPTT")
    for config in args.configs:
        cfg = CONFIGS[config] | ({"batch": args.batch} if args.batch else {})
        tokens = cfg["batch"] * cfg["segments"] * cfg["segment_len"]
        print(f"\n## {config}: " + ", ".join(f"{k} {v}" for k, v in cfg.items()) + f" ({tokens:,} tokens/step)")
        names = [(m, "trainable") for m in args.models]
        names += [(m, "paper") for m in args.models if m in ("rmt", "vanilla", "xl") and args.post_ln]
        contenders = [build(m, cfg, arch, args.precision) for m, arch in names]
        for c in contenders:
            print(f"- {c.name}: {c.params:,} parameters; options {c.options}")
        opts = [torch.optim.AdamW(c.module.parameters(), lr=args.lr) for c in contenders]
        batches = make_batches(cfg, args.rounds * args.steps + args.warmup)
        seconds = [0.0] * len(contenders)
        losses: list[list[float]] = [[] for _ in contenders]
        for c, opt in zip(contenders, opts):
            train_steps(c, opt, batches, args.warmup, 0)
        for r in range(args.rounds):  # alternate, reversing the order every other round
            order = range(len(contenders)) if r % 2 == 0 else reversed(range(len(contenders)))
            for i in order:
                start = time.perf_counter()
                losses[i] += train_steps(contenders[i], opts[i], batches, args.steps, args.warmup + r * args.steps)
                seconds[i] += time.perf_counter() - start
        rows = {}
        for (m, arch), c, sec, ls in zip(names, contenders, seconds, losses):
            mem = subprocess.run(
                [sys.executable, sys.argv[0], "peers", "--configs", config, "--threads", str(args.threads),
                 "--precision", args.precision, "--lr", str(args.lr), "--memory-of", f"{m}:{arch}",
                 *(["--batch", str(args.batch)] if args.batch else [])],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            m_ = json.loads(mem.stdout.strip().splitlines()[-1])
            k = max(1, len(ls) // 5)
            first, last = sum(ls[:k]) / k, sum(ls[-k:]) / k
            rows[c.name] = (tokens * len(ls) / sec, sec / len(ls) * 1000, first, last, m_["peak"], m_["before"])
        head = "model | parameters | tokens/s | ms/step | loss first -> last fifth | falls | peak RSS MB | training MB"
        print(f"\n| {head} |")
        print("|---|---|---|---|---|---|---|---|")
        for c in contenders:
            tps, ms, first, last, peak, before = rows[c.name]
            print(
                f"| {c.name} | {c.params:,} | {tps:,.0f} | {ms:.0f} | {first:.3f} -> {last:.3f} | "
                f"{'yes' if last < first else 'NO'} | {peak:.0f} | {peak - before:.0f} |"
            )
        for ours_name in ("rmt", "vanilla", "xl"):
            if ours_name in rows and f"{ours_name}-peer" in rows:
                ratio = rows[ours_name][0] / rows[f"{ours_name}-peer"][0]
                print(f"{ours_name}: {ratio:.2f}x the peer's tokens/s")
        if any(rows[c.name][3] >= rows[c.name][2] for c in contenders):
            sys.exit("a model's loss did not fall over the timed steps")
