"""`rmt-bench-report DIR...`: the suite's runs beside the paper's numbers, as Markdown tables and PNG figures; any
other directory of runs (a Hydra multirun) as a table by swept keys and learning curves (sweep_report.py).

    rmt-bench-report suite/                      # every benchmark and scale found under suite/
    rmt-bench-report multirun/2026-12-04/10-00-00 --out report/   # a sweep: runs.md and curves_*.png
    rmt-bench-report suite/reverse_fig3 --out docs/results
    rmt-bench-report suite/ --wandb offline      # also into a W&B run (job type "report"): tables and figures

It reads only files (no W&B server): each benchmark directory written by `rmt-bench-suite` holds its
`benchmark.yaml` (the cells and the paper's numbers) and, per scale, per cell, per seed, the run's summary.json.
Per benchmark and scale it writes `<benchmark>_<scale>.md` (ours: mean, min and max over seeds and the number of
runs; the paper's number; cells not run marked) and `<benchmark>_<scale>.png` (the headline metric against the
figure's x axis, one line per series, the paper's numbers dashed: accuracy against segments, perplexity or bpc
against memory size), and prints the tables. Where a cell's runs were evaluated on a grid of lengths
(`rmt-bench-eval RUN --grid segments=...`), the table gains their accuracy against length and
`<benchmark>_<scale>_length.png` draws it against input tokens beside the paper's points (`reference: fig1_*`).
Runs are pooled by the config hash their summary.json records: runs of one cell made with different configurations
(an edited benchmark file, other overrides) get a row each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from rmt_bench.suite import cells
from rmt_bench.sweep_report import save_figure


def find_benchmarks(paths: list[Path]) -> list[Path]:
    """Benchmark directories (holding benchmark.yaml) at or under the given paths."""
    found = []
    for path in paths:
        found += [p.parent for p in sorted(path.rglob("benchmark.yaml"))] if path.is_dir() else []
    return sorted(set(found))


def series_label(spec: dict, series: str | list[str] | None) -> str:
    """A cell's line in the figure: the value of the first series key, then `key value` for the others."""
    keys = [series] if isinstance(series, str) else list(series or [])
    parts = [str(spec.get(keys[0], ""))] if keys else [""]
    parts += [f"{k.rsplit('.', 1)[-1]} {spec[k]}" for k in keys[1:] if k in spec]
    return ", ".join(parts)


def fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"  # perplexities: 2 decimals; accuracy, bpc: 4


def collect(bench_dir: Path, data: dict, scale: str) -> list[dict]:
    """One row per cell and configuration: its runs' headline values, the paper's number, x and series."""
    metric, rows = data["metric"], []
    by_cell: dict[str, tuple] = {}
    for cell in cells(data, scale):
        _, groups = by_cell.setdefault(cell.name, (cell, {}))
        path = cell.run_dir(bench_dir / scale) / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            groups.setdefault(summary.get("config_hash", ""), []).append(summary)
    for cell, groups in by_cell.values():
        x = cell.x if cell.x is not None else cell.keys.get(data.get("x"), cell.name)
        series = series_label(cell.keys, data.get("series")) + (f" ({cell.split})" if cell.split else "")
        name = cell.name + (f" [{cell.split}]" if cell.split else "")
        base = {"name": name, "paper": cell.paper, "x": x, "series": series, "hash": "", "runs": []}
        if not groups:
            rows.append(base | {"values": []})
        for config, runs in sorted(groups.items()):
            values = [r[metric] for r in runs if metric in r]  # a diverged run has a summary without it
            mean = {"mean": sum(values) / len(values)} if values else {}
            rows.append(base | {"hash": config, "runs": runs, "values": values} | mean)
    return rows


def table(bench_dir: Path, scale: str) -> tuple[str, list[dict]]:
    """-> the Markdown table of one benchmark at one scale, and its rows (for the figure)."""
    data = yaml.safe_load((bench_dir / "benchmark.yaml").read_text())
    rows = collect(bench_dir, data, scale)
    runs = [r for row in rows for r in row["runs"]]
    # a run without a curriculum records none: "none", not Python's None
    seen = {key: sorted({str(r.get(key) or "none") for r in runs}) for key in ("arch", "precision", "curriculum")}
    # the direction: the benchmark file's, else the one the runs recorded (the task's MetricSpec)
    recorded = {r["higher_is_better"] for r in runs if "higher_is_better" in r}
    higher = data.get("higher_is_better", recorded.pop() if len(recorded) == 1 else True)
    better = "higher" if higher else "lower"
    lines = [
        f"### {data.get('title', bench_dir.name)} ({scale} scale)",
        "",
        f"`{data['metric']}` ({better} is better), ours over seeds {data['seeds']} (a cell's own `seeds` where it "
        "gives them) beside the paper's number; "
        f"backbone style {', '.join(seen['arch']) or '-'}, precision {', '.join(seen['precision']) or '-'}, "
        f"curriculum {'; '.join(seen['curriculum']) or '-'}.",
        "",
        "| cell | ours (mean) | min | max | runs | paper | ours - paper |",
        "|---|---|---|---|---|---|---|",
    ]
    split = {r["name"] for r in rows if sum(o["name"] == r["name"] for o in rows) > 1}
    for row in rows:
        vals, paper = row["values"], row["paper"]
        shown = "" if paper is None else paper
        label = f"{row['name']} (config {row['hash'] or 'unrecorded'})" if row["name"] in split else row["name"]
        if not vals:
            stopped = sorted({str(r.get("stop_reason")) for r in row["runs"]})
            what = f"stopped ({', '.join(stopped)})" if stopped else "not run"
            lines.append(f"| {label} | {what} | | | 0 | {shown} | |")
            continue
        diff = "" if paper is None else f"{row['mean'] - paper:+.3f}"
        spread = f"{fmt(min(vals))} | {fmt(max(vals))} | {len(vals)}"
        lines.append(f"| {label} | **{fmt(row['mean'])}** | {spread} | {shown} | {diff} |")
    if split:
        names = ", ".join(sorted(split))
        lines += ["", f"Cells run with more than one configuration (a row per config hash, not pooled): {names}."]
    return "\n".join(lines) + "\n", rows


def figure(rows: list[dict], title: str, xlabel: str, ylabel: str, path: Path) -> bool:
    """The figure as a PNG; False (nothing written) without matplotlib, the `report` extra."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(isinstance(r["x"], (int, float)) for r in rows)
    key = (lambda r: r["x"]) if numeric else (lambda r: 0)  # numbers in order; names in the file's order
    place = (lambda r: r["x"]) if numeric else (lambda r: str(r["x"]))
    names = list(dict.fromkeys(r["series"] for r in rows))
    fig, ax = plt.subplots(figsize=(5.5 if len(names) <= 4 else 8.5, 3.8))
    for i, series in enumerate(names):
        mine = sorted((r for r in rows if r["series"] == series), key=key)
        color = f"C{i}"
        done = [r for r in mine if "mean" in r]
        if done:
            ax.plot([place(r) for r in done], [r["mean"] for r in done], "o-", color=color, label=f"{series} (ours)")
        paper = list({place(r): r for r in mine if r["paper"] is not None}.values())
        if paper:
            ax.plot([place(r) for r in paper], [r["paper"] for r in paper], "x--", color=color, alpha=0.6,
                    label=f"{series} (paper)")  # fmt: skip
    xs = [r["x"] for r in rows if numeric and r["x"] > 0]
    if xs and max(xs) / min(xs) > 10:  # memory sizes from 1 to 200: a log axis that keeps 0
        ax.set_xscale("symlog", linthresh=1)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(names) <= 4:
        ax.legend(fontsize=7)
    else:  # many series (Table 2): the legend beside the axes, not over the lines
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def profile_figures(rows: list[dict], metric: str, stem: str, out: Path) -> list[Path]:
    """Language modelling: the test perplexity (or bpc) by position in the segment and by segment of the document,
    one line per cell (the mean over its runs), when the runs recorded them (`<metric>_by_position`)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for kind, xlabel in (("by_position", "position in the segment"), ("by_doc_segment", "segment of the document")):
        key = f"{metric}_{kind}"
        fig, ax, drawn = *plt.subplots(figsize=(6.5, 3.8)), 0
        for row in rows:
            curves = [r[key] for r in row["runs"] if isinstance(r.get(key), list)]
            if not curves:
                continue
            cols = list(zip(*curves))
            mean = [sum(v for v in c if v is not None) / max(sum(v is not None for v in c), 1) for c in cols]
            ax.plot(range(len(mean)), mean, "-", color=f"C{drawn % 10}", label=row["name"], lw=1.2)
            drawn += 1
        if drawn:
            ax.set(xlabel=xlabel, ylabel=key.removeprefix("test/"), title=f"{stem}: {key}")
            made.append(save_figure(fig, ax, out / f"{stem}_{kind}.png"))
        else:
            plt.close(fig)
    return made


def length_results(bench_dir: Path, data: dict, scale: str) -> list[dict]:
    """Each run's accuracy against length, as `rmt-bench-eval RUN --grid segments=...` kept it
    (RUN/eval/grid_segments.json): [{cell, seed, points}] for the runs that have one."""
    found = []
    for cell in cells(data, scale):
        path = cell.run_dir(bench_dir / scale) / "eval" / "grid_segments.json"
        if path.is_file():
            found.append({"cell": cell.name, "seed": cell.seed, "points": json.loads(path.read_text())})
    return found


def length_curves(found: list[dict]) -> list[dict]:
    """The length figure's curves, one per run of `length_results` evaluated beyond its training length (a run
    evaluated at that length only is a row of the table, not a curve): one colour per cell, one marker per seed, and
    the legend naming each cell once, by the settings that tell the plotted cells apart (`task.` dropped)."""
    runs = [r for r in found if any(p["value"] != p["trained"] for p in r["points"])]
    names = list(dict.fromkeys(r["cell"] for r in runs))
    common = set.intersection(*(set(n.split(",")) for n in names)) if len(names) > 1 else set()
    seeds = {n: [r["seed"] for r in runs if r["cell"] == n] for n in names}
    curves = []
    for r in runs:
        short = ",".join(kv.removeprefix("task.") for kv in r["cell"].split(",") if kv not in common) or r["cell"]
        first = r["seed"] == seeds[r["cell"]][0]
        pts = sorted(r["points"], key=lambda p: p["length_tokens"])
        curves.append({
            "label": f"{short} (ours, seed{'s' * (len(seeds[r['cell']]) > 1)} "
                     f"{', '.join(map(str, seeds[r['cell']]))})" if first else None,
            "color": names.index(r["cell"]), "marker": "os^Dv"[seeds[r["cell"]].index(r["seed"]) % 5],
            "tokens": [p["length_tokens"] for p in pts], "acc": [p["test/acc"] for p in pts],
        })  # fmt: skip
    return curves


def length_report(found: list[dict], reference: dict, stem: str, out: Path) -> tuple[str, Path | None]:
    """The follow-up's Fig. 1 / 5 beside ours: a table of accuracy against length per run, and a figure of
    accuracy against input tokens (log axis) with the paper's points (`reference: fig1_*` of the benchmark file,
    at `fig1_segments` x `fig1_segment_len` tokens) dashed. -> (Markdown, the PNG or None without matplotlib)."""
    lines = ["", "#### Accuracy against length (rmt-bench-eval RUN --grid segments=...)", "",
             "| cell | seed | segments | tokens | acc | 95% interval | examples | s / example | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in found:
        for p in run["points"]:
            mark = " (trained)" if p["value"] == p["trained"] else ""
            ci = p.get("test/ci95")
            lines.append(f"| {run['cell']} | {run['seed']} | {p['value']}{mark} | {p['length_tokens']:,} | "
                         f"{p['test/acc']:.4f} | {f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else '-'} | {p['examples']} | "
                         f"{p.get('test/seconds_per_example', float('nan')):.3g} | "
                         f"{p.get('test/peak_memory_mb', float('nan')):.0f} |")  # fmt: skip
    curves = {k: v for k, v in reference.items() if k.startswith("fig1_") and isinstance(v, list)}
    paper_segments, paper_len = curves.pop("fig1_segments", None), reference.get("fig1_segment_len")
    try:
        import matplotlib
    except ImportError:
        return "\n".join(lines) + "\n", None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    curves_ours = length_curves(found)
    palette = plt.get_cmap("tab10" if len({c["color"] for c in curves_ours}) <= 10 else "tab20")
    for c in curves_ours:
        ax.plot(c["tokens"], c["acc"], c["marker"] + "-", color=palette(c["color"] % palette.N), label=c["label"],
                lw=1.2, ms=3.5, mfc="none")  # fmt: skip
    if paper_segments and paper_len:
        tokens = [n * paper_len for n in paper_segments]
        for j, (name, accs) in enumerate(sorted(curves.items())):
            ax.plot(tokens, accs, "xs^dv"[j % 5] + "--", color="0.35", alpha=0.8, lw=1, mfc="none",
                    label=f"follow-up: {name.removeprefix('fig1_')}")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="input tokens", ylabel="test accuracy (greedy)", ylim=(0, 1.02),
           title=f"{stem}: accuracy against length")  # fmt: skip
    return "\n".join(lines) + "\n", save_figure(fig, ax, out / f"{stem}_length.png")


def log_to_wandb(made: list[tuple[str, str, list[dict], Path | None]], out: Path, mode: str) -> str:
    """Each table (a wandb.Table, plus the Markdown) and figure (a wandb.Image) into one run of job type "report"."""
    import wandb

    run = wandb.init(project="rmt-bench", job_type="report", dir=str(out), mode=mode,
                     settings=wandb.Settings(silent=True, console="off"))  # fmt: skip
    for stem, text, rows, png in made:
        columns = ["cell", "series", "x", "config_hash", "ours_mean", "ours_min", "ours_max", "runs", "paper"]
        cells = wandb.Table(columns=columns)
        for r in rows:
            vals = r["values"]
            cells.add_data(r["name"], r["series"], str(r["x"]), r["hash"], r.get("mean"), min(vals, default=None),
                           max(vals, default=None), len(vals), r["paper"])  # fmt: skip
        figure = {f"{stem}/figure": wandb.Image(str(png))} if png is not None else {}
        run.log({f"{stem}/table": cells, f"{stem}/markdown": wandb.Html(f"<pre>{text}</pre>")} | figure)
    where = Path(run.dir).parent  # the run's directory (files/ holds the media)
    run.finish()
    return str(where)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rmt-bench-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="suite output directories (or benchmark directories)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where the .md and .png files go")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"),
                        default=os.environ.get("WANDB_MODE", "disabled"),
                        help="also log tables and figures to W&B (default: $WANDB_MODE, else disabled)")  # fmt: skip
    args = parser.parse_args(argv)
    benches = find_benchmarks(args.dirs)
    if not benches:  # a Hydra multirun or any folder of runs: the runs' own table and curves
        from rmt_bench.sweep_report import report_runs

        missing = [str(d) for d in args.dirs if not d.is_dir()]
        if missing or not any([report_runs(d, args.out) for d in args.dirs]):
            where = ", ".join(missing or map(str, args.dirs))
            print(f"error: no benchmark.yaml and no run (config.json) under {where} (run rmt-bench-suite or a sweep)",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    for bench in benches:
        data = yaml.safe_load((bench / "benchmark.yaml").read_text())
        for scale in [s for s in data["scales"] if (bench / s).is_dir()]:
            text, rows = table(bench, scale)
            stem = f"{bench.name}_{scale}"
            found = length_results(bench, data, scale)
            if found:  # the follow-up's accuracy against length, where runs were evaluated on a grid
                more, _ = length_report(found, data.get("reference") or {}, stem, args.out)
                text += more
            (args.out / f"{stem}.md").write_text(text)
            png = args.out / f"{stem}.png"
            drawn = figure(rows, f"{bench.name} ({scale})", str(data.get("x", "cell")), data["metric"], png)
            profile_figures(rows, data["metric"], stem, args.out)
            made.append((stem, text, rows, png if drawn else None))
            print(text)
            print(f"-> {args.out / stem}.md" + (f", {png}\n" if drawn else "\n"))
    if made and made[0][3] is None:
        print("warning: no figures: matplotlib is not installed (pip install 'rmt-bench[report]')", file=sys.stderr)
    if args.wandb != "disabled":
        where = log_to_wandb(made, args.out, args.wandb)
        print(f"-> W&B ({args.wandb}): {where}" + (f" (upload: wandb sync {where})" if args.wandb == "offline" else ""))


if __name__ == "__main__":
    main()
