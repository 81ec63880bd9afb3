"""`rmt-bench-report DIR...`: the suite's runs beside the paper's numbers, as Markdown tables and PNG figures.

    rmt-bench-report suite/                      # every benchmark and scale found under suite/
    rmt-bench-report suite/reverse_fig3 --out docs/results

It reads only files (no W&B server): each benchmark directory written by `rmt-bench-suite` holds its
`benchmark.yaml` (the cells and the paper's numbers) and, per scale, per cell, per seed, the run's summary.json.
Per benchmark and scale it writes `<benchmark>_<scale>.md` (ours: mean, min and max over seeds and the number of
runs; the paper's number; cells not run marked) and `<benchmark>_<scale>.png` (the headline metric against the
figure's x axis, one line per model, the paper's numbers dashed), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from rmt_bench.suite import cells


def find_benchmarks(paths: list[Path]) -> list[Path]:
    """Benchmark directories (holding benchmark.yaml) at or under the given paths."""
    found = []
    for path in paths:
        found += [p.parent for p in sorted(path.rglob("benchmark.yaml"))] if path.is_dir() else []
    return sorted(set(found))


def table(bench_dir: Path, scale: str) -> tuple[str, list[dict]]:
    """-> the Markdown table of one benchmark at one scale, and its rows (for the figure)."""
    data = yaml.safe_load((bench_dir / "benchmark.yaml").read_text())
    metric = data["metric"]
    rows = {}
    for cell in cells(data, scale):
        row = rows.setdefault(cell.name, {"name": cell.name, "paper": cell.paper, "values": []})
        summary = cell.run_dir(bench_dir / scale) / "summary.json"
        if summary.exists():
            row["values"].append(json.loads(summary.read_text())[metric])
    x, series = data.get("x"), data.get("series")
    for spec, row in zip(data["cells"], rows.values()):
        row["x"], row["series"] = spec.get(x, row["name"]), spec.get(series, "")
    lines = [
        f"### {data.get('title', bench_dir.name)} ({scale} scale)",
        "",
        f"`{metric}`, ours over seeds {data['seeds']} beside the paper's number.",
        "",
        "| cell | ours (mean) | min | max | runs | paper | ours - paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        vals, paper = row["values"], row["paper"]
        shown = "" if paper is None else paper
        if not vals:
            lines.append(f"| {row['name']} | not run | | | 0 | {shown} | |")
            continue
        row["mean"] = mean = sum(vals) / len(vals)
        diff = "" if paper is None else f"{mean - paper:+.3f}"
        lines.append(
            f"| {row['name']} | **{mean:.4f}** | {min(vals):.4f} | {max(vals):.4f} | {len(vals)} | {shown} | {diff} |"
        )
    return "\n".join(lines) + "\n", list(rows.values())


def figure(rows: list[dict], title: str, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        mine = [r for r in rows if r["series"] == series]
        color = f"C{i}"
        done = [r for r in mine if "mean" in r]
        if done:
            ax.plot([str(r["x"]) for r in done], [r["mean"] for r in done], "o-", color=color, label=f"{series} (ours)")
        paper = [r for r in mine if r["paper"] is not None]
        if paper:
            ax.plot([str(r["x"]) for r in paper], [r["paper"] for r in paper], "x--", color=color, alpha=0.6,
                    label=f"{series} (paper)")  # fmt: skip
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rmt-bench-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="suite output directories (or benchmark directories)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where the .md and .png files go")
    args = parser.parse_args(argv)
    benches = find_benchmarks(args.dirs)
    if not benches:
        print(f"error: no benchmark.yaml under {', '.join(map(str, args.dirs))} (run rmt-bench-suite)", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for bench in benches:
        data = yaml.safe_load((bench / "benchmark.yaml").read_text())
        for scale in [s for s in data["scales"] if (bench / s).is_dir()]:
            text, rows = table(bench, scale)
            stem = f"{bench.name}_{scale}"
            (args.out / f"{stem}.md").write_text(text)
            figure(rows, f"{bench.name} ({scale})", data.get("x", "cell"), data["metric"], args.out / f"{stem}.png")
            print(text)
            print(f"-> {args.out / stem}.md, {args.out / stem}.png\n")


if __name__ == "__main__":
    main()
