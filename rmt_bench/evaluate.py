"""`rmt-bench-eval`: a finished run evaluated at settings it was not trained on, with the weights it tested.

    rmt-bench-eval RUN task.segments=8 task.length=48        # reverse-48 in 8 segments of 12: one setting
    rmt-bench-eval RUN --mem-len 48                          # Transformer-XL with a longer evaluation cache
    rmt-bench-eval RUN_A RUN_B --grid segments=1,2,4,8,16    # the follow-up's Fig. 5: accuracy against length

One setting: the run's task config with the given `task.*` keys, the same metrics as its test (greedy accuracy,
teacher-forced accuracy, exact match, loss; perplexity for language modelling), into RUN/eval/<setting>.json.
A grid: for every run and value, the task at that value of a curriculum key (`segments`: the segment length stays
and the sequence grows, e.g. reverse-24 in 4 segments of 12 -> reverse-48 in 8; `length` or `num_pairs`: the
segment count stays), evaluated on `--examples` test examples; a table (`eval_grid.md`) and a figure
(`eval_grid.png`, accuracy against the segments evaluated, one line per run, each run's training setting marked)
in --out (default: the current directory), and each run's points in RUN/eval/grid_<key>.json (merged over calls,
so a short grid with many examples and a long one with few make one curve; `rmt-bench-report` draws a suite's
accuracy against length from them). `--weights final` evaluates the weights of the run's last step instead of
the best validation's (files marked `final_weights`; the report keeps to the tested ones). Bad combinations (a
length the segment count does not divide, a task the run was not trained on) are one line each.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rmt_bench.config import ConfigError
from rmt_bench.errors import CheckpointError
from rmt_bench.finished import open_run
from rmt_bench.tasks import build_task
from rmt_bench.train.loop import autocast_factory, evaluate
from rmt_bench.train.precision import resolve as resolve_precision


def precision_of(summary_path: Path):
    """The autocast of the run's own evaluation (summary.json's eval_precision), else this machine's choice."""
    if summary_path.is_file():
        bf16 = json.loads(summary_path.read_text()).get("eval_precision") == "bf16"
    else:
        bf16 = resolve_precision("auto", torch.device("cpu")).eval_bf16
    return autocast_factory(torch.device("cpu"), bf16)


def label_of(words: list[str], mem_len: int | None, reset: bool = False, weights: str = "best") -> str:
    parts = [w.removeprefix("task.") for w in words] + ([f"mem_len={mem_len}"] if mem_len is not None else [])
    parts += (["memory_reset"] if reset else []) + (["final_weights"] if weights == "final" else [])
    return ",".join(parts) or "as_trained"


def one_setting(
    run_dir: Path, words: list[str], mem_len: int | None, batch_size: int, reset: bool = False, weights: str = "best"
) -> dict:
    cfg, task, model = open_run(run_dir, words, weights=weights)
    settings = ({"mem_len": mem_len} if mem_len is not None else {}) | ({"reset_memory": True} if reset else {})
    if reset and not model.writes(model.initial_state()):
        raise ConfigError("--memory-reset", f"the run's model ({cfg.model.name}) carries no memory tokens to reset")
    if mem_len is not None and not model.cfg.mem_len:
        raise ConfigError("--mem-len", f"the run's model ({cfg.model.name}) has no Transformer-XL cache")
    metrics = evaluate(model, task, "test", batch_size, precision_of(run_dir / "summary.json"), **settings)
    record = {
        "run": str(run_dir),
        "setting": words,
        "mem_len": mem_len,
        "memory_reset": reset,
        "weights": weights,
        "task": asdict(cfg.task),
    }
    record |= {f"test/{k}": v for k, v in metrics.items()}
    out = run_dir / "eval" / f"{label_of(words, mem_len, reset, weights)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record | {"file": str(out)}


def grid(
    run_dirs: list[Path], key: str, values: list[int], examples: int, batch_size: int, weights: str = "best"
) -> list[dict]:
    """Every run at every value of `key` -> rows {run, model, trained, value, segments, acc, ...}."""
    rows = []
    for run_dir in run_dirs:
        sizes = [f"task.test_size={examples}", "task.valid_size=1", "task.train_size=1"]
        cfg, own, model = open_run(run_dir, sizes, weights=weights)
        keys = getattr(cfg.task, "curriculum_keys", ())
        if key not in keys:
            known = ", ".join(keys) or "none"
            raise ConfigError("--grid", f"{run_dir}: task {cfg.task.name} cannot vary '{key}' (it varies: {known})")
        autocast = precision_of(run_dir / "summary.json")
        trained = cfg.task.key_value[key]
        for value in values:
            setting = cfg.task if value == trained else cfg.task.at({key: value})
            if hasattr(own, "evaluate_long"):  # streamed segment by segment: any length, flat memory
                long = own.evaluate_long(model, value, examples, batch_size, autocast)
                metrics = {"acc": long.pop("acc")} | long
            else:
                task = build_task(replace(setting, test_size=examples), splits=("test",))
                metrics = evaluate(model, task, "test", batch_size, autocast)
            rows.append({"run": str(run_dir), "model": cfg.model.name, "key": key, "value": value,
                         "trained": trained, "weights": weights, "segments": setting.segments,
                         "length_tokens": setting.seq_len,
                         "examples": examples} | {f"test/{k}": v for k, v in metrics.items()})  # fmt: skip
            extra = "".join(f" {k} {metrics[k]:.3g}" for k in ("seconds_per_example", "peak_memory_mb") if k in metrics)
            if "acc_by_order" in metrics:  # reason: which orders of the facts the model answers
                extra += " | by order " + ", ".join(f"{o} {a:.2f}" for o, a in metrics["acc_by_order"].items())
            print(f"{run_dir.name} ({cfg.model.name}, trained {key}={trained}): {key}={value} "
                  f"({setting.seq_len} tokens) acc {metrics['acc']:.4f}{extra}", flush=True)  # fmt: skip
    return rows


def write_grid(rows: list[dict], out: Path) -> None:
    """eval_grid.md, eval_grid.json and eval_grid.png (accuracy against the value, one line per run)."""
    out.mkdir(parents=True, exist_ok=True)
    key = rows[0]["key"]
    seg = key != "segments"  # the segment count as a column of its own, unless it is the grid's key
    held = any("test/answers_held" in r for r in rows)  # the facts tasks: places answered right >= 90% of the time
    head = ["run", "model", f"trained {key}", key, *(["segments"] if seg else []), "tokens", "greedy acc",
            "95% interval", *(["places held (of 6)"] if held else []), "examples", "s / example",
            "peak MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " (trained)" if r["value"] == r["trained"] else ""
        ci = "-" if "test/ci95" not in r else f"{r['test/ci95'][0]:.3f}-{r['test/ci95'][1]:.3f}"
        timing = [
            f"{r[f'test/{k}']:.3g}" if f"test/{k}" in r else "-" for k in ("seconds_per_example", "peak_memory_mb")
        ]
        segments = [r["segments"]] if seg else []
        places = [r.get("test/answers_held", "-")] if held else []
        cells = [Path(r["run"]).name, r["model"], r["trained"], f"{r['value']}{mark}", *segments, r["length_tokens"],
                 f"{r['test/acc']:.4f}", ci, *places, r["examples"], *timing]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    (out / "eval_grid.md").write_text("\n".join(lines) + "\n")
    (out / "eval_grid.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib
    except ImportError:
        print("warning: no figure: matplotlib is not installed (pip install 'rmt-bench[report]')", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["value"])
        label = f"{mine[0]['model']} trained on {key}={mine[0]['trained']} ({Path(run).name})"
        ax.plot([r["value"] for r in mine], [r["test/acc"] for r in mine], "o-", color=f"C{i}", label=label)
        ax.axvline(mine[0]["trained"], color=f"C{i}", ls=":", alpha=0.6)
    values = [r["value"] for r in rows]
    if max(values) / min(values) > 10:  # the follow-up's Fig. 1: lengths over orders of magnitude
        ax.set_xscale("log")
    ax.set(xlabel=f"{key} evaluated", ylabel="test accuracy (greedy)", ylim=(0, 1.02), title="accuracy against length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "eval_grid.png", dpi=120)
    plt.close(fig)


def keep_grid(run_dir: Path, rows: list[dict]) -> Path:
    """The run's own grid points into RUN/eval/grid_<key>.json, merged with those of earlier grids (a value
    evaluated again replaces its row): `rmt-bench-report` draws a suite's accuracy against length from them."""
    final = "_final_weights" if rows[0].get("weights") == "final" else ""  # kept apart: the report reads the tested
    path = run_dir / "eval" / f"grid_{rows[0]['key']}{final}.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    merged = {r["value"]: r for r in old} | {r["value"]: r for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([merged[v] for v in sorted(merged)], indent=2))
    return path


def parse_grid(text: str) -> tuple[str, list[int]]:
    key, sep, values = text.partition("=")
    try:
        parsed = [int(v) for v in values.split(",")] if sep else []
    except ValueError:
        parsed = []
    if not parsed or any(v < 1 for v in parsed):
        raise ConfigError(
            "--grid", f"expected KEY=V1,V2,... with whole values >= 1 (e.g. segments=1,2,4,8), got {text}"
        )
    return key.removeprefix("task."), parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rmt-bench-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="+", help="run directories, then task.KEY=VALUE settings (one-setting mode)")
    parser.add_argument(
        "--grid", default=None, help="KEY=V1,V2,...: every run at every value (segments, length, num_pairs)"
    )
    parser.add_argument("--mem-len", type=int, default=None, help="Transformer-XL evaluation cache length")
    parser.add_argument("--memory-reset", action="store_true",
                        help="the memory-reset control: every segment reads the initial memory (RMT)")  # fmt: skip
    parser.add_argument("--examples", type=int, default=500, help="test examples per grid point (default 500)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=Path("."), help="where a grid's table and figure go")
    parser.add_argument("--weights", choices=("best", "final"), default="best",
                        help="best: the best validation's weights, the ones the run tested (default); final: its last "
                        "step's")  # fmt: skip
    args = parser.parse_args(argv)
    # run directories may hold '=' (suite cells: model=rmt,mem=5/seed0): an existing directory is a run
    runs = [Path(a) for a in args.args if Path(a).is_dir() or "=" not in a]
    words = [a for a in args.args if not (Path(a).is_dir() or "=" not in a)]
    try:
        if args.grid is not None:
            if words:
                raise ConfigError(words[0].split("=")[0], "a grid varies one key; give settings without --grid")
            key, values = parse_grid(args.grid)
            rows = grid(runs, key, values, args.examples, args.batch_size, args.weights)
            write_grid(rows, args.out)
            for run in runs:
                keep_grid(run, [r for r in rows if r["run"] == str(run)])
            print(f"-> {args.out / 'eval_grid.md'}, {args.out / 'eval_grid.png'}")
            return
        if len(runs) != 1:
            raise ConfigError("run_dir", f"one run directory for one setting (got {len(runs)}); --grid takes several")
        record = one_setting(runs[0], words, args.mem_len, args.batch_size, args.memory_reset, args.weights)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    shown = ", ".join(f"{k.removeprefix('test/')} {v:.4f}" for k, v in record.items() if k.startswith("test/"))
    print(f"{label_of(words, args.mem_len, args.memory_reset, args.weights)}: {shown} -> {record['file']}")


if __name__ == "__main__":
    main()
