"""Training throughput and memory of every model, and RMT evaluation cost against sequence length.

    python scripts/bench.py train --task reverse --batch-size 64 --steps 20
    python scripts/bench.py eval-scaling --segments 4 16 64 256
    python scripts/bench.py matmul          # is bf16 faster than fp32 on this CPU?
    python scripts/bench.py runs --seeds 0 1 2 -- task=reverse model=rmt mem=6   # whole runs, wall clock
    python scripts/bench.py eval --task copy  # the test evaluation (greedy decoding) of an rmt model
    python scripts/bench.py peers           # ours vs the public implementations at equal size (pip install .[bench])

Numbers go to docs/PERFORMANCE.md together with the command that produced them. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rmt_bench.config import ModelConfig, TaskConfig, model_switches
from rmt_bench.models import SegmentState, build_model, train_segments
from rmt_bench.tasks import build_task
from rmt_bench.train.loop import autocast_factory

sys.path.insert(0, str(Path(__file__).parent))
from peers import MODELS as PEER_MODELS  # noqa: E402
from peers import bench_peers  # noqa: E402

SIZES = {"reverse": dict(n_layer=4, d_model=128, n_head=4, d_head=64, d_inner=256)}


def model_config(name: str, mem: int, **sizes) -> ModelConfig:
    return ModelConfig(**sizes, **model_switches(name, mem))


def bench_train(args) -> None:
    task = build_task(TaskConfig(name=args.task, segments=args.segments, train_size=4096, valid_size=1, test_size=1))
    autocast = autocast_factory(torch.device("cpu"), args.bf16)
    print(
        f"task={args.task} segments={args.segments} batch={args.batch_size} mem={args.mem} "
        f"threads={torch.get_num_threads()} bf16={args.bf16}"
    )
    print("| model | tokens/s | ms/step | peak RSS MB |")
    print("|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(model_config(name, args.mem, **SIZES["reverse"]), task.vocab_size)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        batches = task.train_batches(args.batch_size, seed=0)
        for i in range(args.steps + args.warmup):
            if i == args.warmup:
                start = time.perf_counter()
            b = next(batches)
            opt.zero_grad()
            w = b.loss_mask.float()
            train_segments(model, b.inputs, b.targets, w, w.sum().item(), -1, autocast=autocast)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
        dt = (time.perf_counter() - start) / args.steps
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {name} | {b.inputs.numel() / dt:,.0f} | {dt * 1000:.0f} | {rss:.0f} |")


@torch.no_grad()
def bench_eval_scaling(args) -> None:
    """RMT evaluation of ever longer sequences, segment by segment with the state carried and the segment's
    tokens drawn as it comes (a stream: nothing grows with the length), the head's prediction included: time
    per token and peak memory should stay flat. Paper's reverse sizes, `--segment-len`, `--mem`."""
    torch.manual_seed(0)
    model = build_model(model_config("rmt", args.mem, **SIZES["reverse"]), 12).eval()
    print(
        f"rmt mem={args.mem} segment_len={args.segment_len} batch={args.batch_size} threads={torch.get_num_threads()}"
    )
    print("| segments | tokens per sequence | seconds | us/token | peak RSS MB |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for n_seg in args.segments:
        state = SegmentState()
        start = time.perf_counter()
        for _ in range(n_seg):  # state carried, nothing kept: memory stays flat
            x = torch.randint(2, 12, (args.batch_size, args.segment_len), generator=gen)
            hidden, state = model.segment(x, state)
            model.head.logits(hidden).argmax(-1)
        dt = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tokens = n_seg * args.segment_len
        print(f"| {n_seg:,} | {tokens:,} | {dt:.2f} | {dt / (tokens * args.batch_size) * 1e6:.2f} | {rss:.0f} |")


@torch.no_grad()
def bench_eval(args) -> None:
    """The 10,000-example test evaluation (teacher-forced pass and greedy decoding across segments) of a
    paper-sized rmt model, timed. Only public functions are used, so the same script times an older checkout
    (PYTHONPATH=<checkout>) on the same examples and weights: the accuracies printed must agree."""
    from rmt_bench.train.loop import evaluate

    segments, mem = {"reverse": (4, 6), "copy": (3, 24)}[args.task]
    task = build_task(TaskConfig(name=args.task, segments=segments, train_size=1, valid_size=1, test_size=args.size))
    torch.manual_seed(0)
    model = build_model(model_config("rmt", mem, **SIZES["reverse"]), task.vocab_size).eval()
    threads = torch.get_num_threads()
    print(f"{args.task}-24 in {segments} segments, rmt mem={mem}, {args.size:,} examples, threads={threads}")
    print("| eval batch | seconds | acc (greedy) | acc_tf | exact |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_size:
        start = time.perf_counter()
        out = evaluate(model, task, "test", batch_size, contextlib.nullcontext)
        dt = time.perf_counter() - start
        print(f"| {batch_size} | {dt:.1f} | {out['acc']:.4f} | {out['acc_tf']:.4f} | {out['exact']:.4f} |")


def bench_matmul(args) -> None:
    """fp32 vs bf16 matmul throughput at the model's shapes and at a large square size."""
    print("| dtype | shape | GFLOP/s |")
    print("|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((6144, 128, 768), (2048, 2048, 2048)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b
            reps = 20
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            dt = (time.perf_counter() - start) / reps
            print(f"| {str(dtype).removeprefix('torch.')} | {m}x{k} @ {k}x{n} | {2 * m * k * n / dt / 1e9:,.0f} |")


def bench_runs(args) -> None:
    """Whole `rmt-bench` runs as a user types them (W&B offline as by default), one after another, each timed
    by the wall clock from start to exit: set-up, training, validation, the test evaluation, and the
    memory-reset control, switched on so that `reset acc` is the test accuracy of the same weights with the
    memory reset at every segment (`test min` is the time of both test evaluations)."""
    out = Path(args.out or tempfile.mkdtemp(prefix="rmt-bench-runs-"))
    rows = []
    for model in args.models or [None]:
        for seed in args.seeds:
            name = f"{model or 'default'}-seed{seed}"
            overrides = [*args.overrides, *([f"model={model}"] if model else []), f"seed={seed}"]
            cmd = ["rmt-bench", *overrides, "trainer.memory_reset_control=true", f"hydra.run.dir={out / name}"]
            print("$", " ".join(cmd[:-1]), flush=True)
            start = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-m", "rmt_bench.cli", *cmd[1:]], env=os.environ | {"WANDB_SILENT": "true"}
            )
            wall = (time.perf_counter() - start) / 60
            if res.returncode:
                rows.append(f"| {model or '-'} | {seed} | failed (exit {res.returncode}) | | | | | | | |")
                continue
            s = json.loads((out / name / "summary.json").read_text())
            reset = s.get("test_memory_reset/acc")
            rows.append(
                f"| {s['model']} | {seed} | {s['steps']:,} / {s['budget_steps']:,} | {s['stop_reason']} | "
                f"{s['train_minutes']:.1f} | {s['test_minutes']:.1f} | {wall:.1f} | **{s['test/acc']:.4f}** | "
                f"{s['test/exact']:.4f} | "
                f"{'-' if reset is None else f'{reset:.4f}'} |"
            )
    print(f"\nrmt-bench {' '.join(args.overrides)} (run dirs under {out})")
    head = (
        "model | seed | steps / budget | stop | train min | test min | wall min | test acc (greedy) | exact | reset acc"
    )
    print(f"| {head} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    accs = [float(r.split("**")[1]) for r in rows if "**" in r]
    if accs:
        print(f"\nminimum test acc over {len(accs)} runs: {min(accs):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--task", default="reverse")
    t.add_argument("--segments", type=int, default=4)
    t.add_argument("--models", nargs="+", default=["vanilla", "memtr", "xl", "rmt", "rmt_xl"])
    t.add_argument("--mem", type=int, default=6)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--bf16", action="store_true")
    e = sub.add_parser("eval-scaling")
    e.add_argument("--segments", type=int, nargs="+", default=[4, 16, 64, 256])
    e.add_argument("--segment-len", type=int, default=12)
    e.add_argument("--mem", type=int, default=6)
    e.add_argument("--batch-size", type=int, default=32)
    sub.add_parser("matmul")
    v = sub.add_parser("eval", help="time the test evaluation (greedy decoding) of a paper-sized rmt model")
    v.add_argument("--task", choices=["reverse", "copy"], default="reverse")
    v.add_argument("--size", type=int, default=10_000)
    v.add_argument("--batch-size", type=int, nargs="+", default=[1000])
    r = sub.add_parser("runs", help="whole rmt-bench runs per seed (and model), timed by the wall clock")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--models", nargs="+", default=None, help="one run per model and seed (default: as configured)")
    r.add_argument("--out", default=None, help="where the run dirs go (default: a new temporary directory)")
    r.add_argument("overrides", nargs="*", help="rmt-bench overrides, after --")
    p = sub.add_parser(
        "peers", help="ours vs recurrent-memory-transformer-pytorch and x-transformers (scripts/peers.py)"
    )
    p.add_argument("--configs", nargs="+", choices=["reverse", "wide"], default=["reverse", "wide"])
    p.add_argument("--models", nargs="+", choices=PEER_MODELS, default=PEER_MODELS)
    p.add_argument("--post-ln", action="store_true", help="also our models with the paper's post-LN backbone")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="for all models (bf16: autocast)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=None, help="instead of the config's batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    commands = {
        "train": bench_train,
        "eval-scaling": bench_eval_scaling,
        "matmul": bench_matmul,
        "runs": bench_runs,
        "eval": bench_eval,
        "peers": bench_peers,
    }
    with contextlib.suppress(KeyboardInterrupt):
        commands[args.cmd](args)


if __name__ == "__main__":
    main()
