"""`rmt-bench-report` on any directory of runs (a Hydra multirun, a folder of single runs): a table and learning
curves, from the runs' own files (no W&B server).

The runs are the directories under the path that hold a config.json. Each run's overrides come from Hydra's
`.hydra/overrides.yaml` (else its directory name); the keys whose values differ between runs, seed aside, are the
swept keys, and runs that agree on them form a group (their seeds pooled: mean, min, max and count). Per group the
table gives the best validation and the test value of the task's headline metric (summary.json's `metric`), the
steps and the minutes; a run without summary.json is marked `failed or unfinished`, one whose `stop_reason` is a
signal or a non-finite loss `stopped (...)`, and the lines of the sweep's failed_jobs.txt follow the table. The
learning curves are one PNG per metric of metrics.jsonl (`train/loss`, every `val/*`), one line per run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

STOPPED = ("signal", "non_finite_loss")


def save_figure(fig, ax, path: Path) -> Path:
    """A figure with a grid and the legend beside the axes (not over the lines), written as a PNG and closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def find_runs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("config.json") if ".hydra" not in p.parts and "wandb" not in p.parts})


def overrides_of(run: Path) -> dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    words = yaml.safe_load(path.read_text()) or [] if path.is_file() else run.name.split(",")
    return dict(w.lstrip("+~").split("=", 1) for w in words if "=" in w)


def load(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    return {"dir": run, "overrides": overrides_of(run), "summary": summary}


def grouped(runs: list[dict]) -> tuple[list[str], dict[str, list[dict]]]:
    """The swept keys (values differ between runs; the seed pooled) and the runs of each group, by label."""
    keys = sorted({k for r in runs for k in r["overrides"]} - {"seed"})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        label = ",".join(f"{k}={r['overrides'].get(k, '-')}" for k in swept) or "all runs"
        groups.setdefault(label, []).append(r)
    return swept, groups


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"**{mean:.4f}** ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else f"**{mean:.4f}**"


def table(root: Path) -> tuple[str, list[dict]]:
    runs = [load(r) for r in find_runs(root)]
    swept, groups = grouped(runs)
    done = [r["summary"] for r in runs if r["summary"] and "metric" in r["summary"]]
    metric = done[0]["metric"] if done else "acc"
    lines = [f"### Runs under {root}", "",
             f"{len(runs)} runs; groups by the swept keys ({', '.join(swept) or 'none'}), seeds pooled: mean "
             f"(min-max); the headline metric `{metric}`.", "",
             f"| group | runs | best val {metric} | test {metric} | steps | minutes | status |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, members in groups.items():
        ok = [m["summary"] for m in members if m["summary"] and f"test/{metric}" in m["summary"]]
        status = []
        for m in members:
            s = m["summary"]
            if s is None:
                status.append(f"{m['dir'].name}: failed or unfinished")
            elif s.get("stop_reason") in STOPPED:
                status.append(f"{m['dir'].name}: stopped ({s['stop_reason']})")
        steps = "/".join(str(s["steps"]) for s in ok) or "-"
        minutes = "/".join(f"{s['train_minutes']:.1f}" for s in ok) or "-"
        lines.append(f"| {label} | {len(ok)} of {len(members)} | {spread([s[f'val/best_{metric}'] for s in ok])} | "
                     f"{spread([s[f'test/{metric}'] for s in ok])} | {steps} | {minutes} | "
                     f"{'; '.join(status) or 'done'} |")  # fmt: skip
    failed = root / "failed_jobs.txt"
    if failed.is_file():
        lines += ["", "Failed jobs (failed_jobs.txt):", "", *[f"- {x}" for x in failed.read_text().splitlines()]]
    return "\n".join(lines) + "\n", runs


def curves(runs: list[dict], out: Path) -> list[Path]:
    """One PNG per metric of the runs' metrics.jsonl, one line per run."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list, list]]] = {}
    _, groups = grouped(runs)
    for label, members in groups.items():
        for m in members:
            path = m["dir"] / "metrics.jsonl"
            if not path.is_file():
                continue
            name = f"{label}, seed {m['overrides'].get('seed', '0')}"
            for line in path.read_text().splitlines():
                row = json.loads(line)
                for key, value in row.items():
                    if (key == "train/loss" or key.startswith("val/")) and isinstance(value, (int, float)):
                        xs, ys = series.setdefault(key, {}).setdefault(name, ([], []))
                        xs.append(row["step"])
                        ys.append(value)
    made = []
    for key, lines in series.items():
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for i, (name, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, "-", color=f"C{i % 10}", label=name, lw=1.2)
        ax.set(xlabel="step", ylabel=key, title=key)
        made.append(save_figure(fig, ax, out / f"curves_{key.replace('/', '_')}.png"))
    return made


def report_runs(root: Path, out: Path) -> bool:
    """The table (runs.md) and the curves of the runs under `root`; False when it holds no run."""
    if not find_runs(root):
        return False
    out.mkdir(parents=True, exist_ok=True)
    text, runs = table(root)
    (out / "runs.md").write_text(text)
    print(text)
    made = curves(runs, out)
    print(f"-> {out / 'runs.md'}" + (f", {len(made)} learning-curve figures (curves_*.png)" if made else ""))
    return True
