"""Associative retrieval, accuracy by the queried pair: which pairs a trained run's memory keeps.

    python scripts/retrieval_by_pair.py RUN [RUN ...] [--examples 2000]

Per run, the test examples grouped by the queried pair (1 = the first of the sequence), with the segment its value
stands in, the segment boundaries between that value and the query (the memory writes it must survive: 0 = in the
query's own segment), the greedy accuracy (the answer is one token: greedy = teacher-forced) and, of the wrong
answers, the share that is another pair's value (1.0: the values are kept and the key each belongs to lost; with
distinct values a guess among the 9 other digits names another pair's value (pairs - 1) / 9 of the time). The
weighted mean over the pairs is the run's test accuracy on the same examples. Into RUN/eval/by_pair.json and
printed as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rmt_bench.config import ConfigError
from rmt_bench.errors import CheckpointError
from rmt_bench.evaluate import precision_of
from rmt_bench.finished import open_run


def by_pair(run_dir: Path, examples: int, batch_size: int = 500) -> list[dict]:
    """-> one row per pair index: {pair, value_segment, boundaries, examples, acc, wrong_other_value}."""
    cfg, task, model = open_run(run_dir, [f"task.test_size={examples}", "task.valid_size=1", "task.train_size=1"])
    if cfg.task.name != "retrieval":
        raise ConfigError("run_dir", f"{run_dir} was trained on {cfg.task.name}; this reads retrieval runs only")
    pairs, n, front = cfg.task.num_pairs, cfg.task.segment_len, task.pad_front
    query = front + 2 * pairs + 1  # the query key's input position: the answer is the target there
    right, seen, swapped = torch.zeros(pairs), torch.zeros(pairs), torch.zeros(pairs)
    autocast = precision_of(run_dir / "summary.json")
    with torch.no_grad(), autocast():
        for batch in task.eval_batches("test", batch_size):
            out, _ = model(batch.inputs, model.initial_state(pad=front))
            pred = model.head.logits(out[batch.loss_mask]).argmax(-1)  # (B,): one answer token an example
            hit = (pred == batch.targets[batch.loss_mask]).float()
            flat = batch.inputs.flatten(1)  # (B, S * n): k1 v1 ... kP vP ? kq
            keys, values = flat[:, front : front + 2 * pairs : 2], flat[:, front + 1 : front + 2 * pairs : 2]
            which = (keys == flat[:, query : query + 1]).float().argmax(1)  # the queried pair, 0-based
            other = (values == pred[:, None]).any(1).float() * (1 - hit)  # wrong, and another pair's value
            right += torch.zeros(pairs).index_add_(0, which, hit)
            swapped += torch.zeros(pairs).index_add_(0, which, other)
            seen += torch.bincount(which, minlength=pairs).float()
    rows = []
    for j in range(pairs):
        segment, wrong = (front + 2 * j + 1) // n, seen[j] - right[j]  # the value's segment
        rows.append({"pair": j + 1, "value_segment": segment + 1, "boundaries": query // n - segment,
                     "examples": int(seen[j]), "acc": float(right[j] / seen[j]) if seen[j] else None,
                     "wrong_other_value": float(swapped[j] / wrong) if wrong else None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished retrieval runs")
    parser.add_argument("--examples", type=int, default=2000, help="test examples (default 2000)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        print(f"error: --examples: must be >= 1, got {args.examples}", file=sys.stderr)
        sys.exit(2)
    for run in args.runs:
        try:
            rows = by_pair(run, args.examples)
        except (ConfigError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / "by_pair.json").write_text(json.dumps(rows, indent=2))
        total = sum(r["examples"] for r in rows)
        mean = sum(r["acc"] * r["examples"] for r in rows if r["acc"] is not None) / total
        print(f"{run} (test acc on these {total} examples: {mean:.4f})")
        print("| pair | value in segment | boundaries to the query | examples | acc | wrong: another pair's value |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            acc, other = ("-" if r[k] is None else f"{r[k]:.3f}" for k in ("acc", "wrong_other_value"))
            print(f"| {r['pair']} | {r['value_segment']} | {r['boundaries']} | {r['examples']} | {acc} | {other} |")


if __name__ == "__main__":
    main()
