"""`rmt-bench-inspect RUN_DIR`: what the memory does, as the paper's Fig. 6 and Fig. 9 show it: the attention of
the trained model's memory operations, read from its own attention probabilities.

    rmt-bench-inspect outputs/.../run                   # the mean over 100 validation examples, every segment
    rmt-bench-inspect RUN --example 3 --heads           # one example (its tokens on the axes), every head too

For each segment of the examples (teacher-forced, the state carried as in training), every layer's attention
probabilities over `[cache ; read ; tokens ; write]` are captured (`RecurrentModel.segment(capture=...)`; nothing
is captured, and nothing costs, otherwise) and drawn as the paper draws them, one panel per layer:
- `write`: the write block's rows over `[read ; tokens ; write]` (Fig. 6a: what each memory slot stores; 6c: its
  read-memory columns, the rewrite of the memory);
- `read`: the token rows over the read memory (Fig. 6b: the tokens reading the memory);
- `cache`: the token rows over the Transformer-XL cache (Fig. 6d, Fig. 9's Tr-XL side).
Each PNG has beside it the probabilities (`.npz`: `prob` (layers, [heads,] rows, columns), the block sizes
`cache`, `read`, `tokens`, `write`, and the row and column labels), and `inspect.json` gives per segment and layer
the write order: the rank correlation between a write slot's index and the position of the token it attends to
most (copy writes in order: near +1; reverse in reversed order: near -1). Files go to RUN_DIR/inspect unless
--out says otherwise; with a W&B logger (the run's, or --wandb) the images go into a W&B run of job type "inspect".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from rmt_bench.config import ConfigError
from rmt_bench.errors import CheckpointError
from rmt_bench.finished import open_run

KINDS = ("write", "read", "cache")


@torch.no_grad()
def capture(model, inputs: torch.Tensor, pad_front: int) -> list[dict]:
    """inputs (B, S, n) -> per segment: `prob` (L, B, H, Q, K) and the block sizes of its rows and columns."""
    state, out = model.initial_state(pad=pad_front), []
    for s in range(inputs.shape[1]):
        cache = state.cache[0].shape[1] if state.cache else 0
        read = model.cfg.num_mem_tokens
        write = read if model.writes(state) else 0
        probs: list[torch.Tensor] = []
        _, state = model.segment(inputs[:, s], state, capture=probs)
        out.append({"prob": torch.stack(probs), "cache": cache, "read": read, "tokens": inputs.shape[2],
                    "write": write})  # fmt: skip
    return out


def blocks(seg: dict) -> dict[str, tuple[slice, slice]]:
    """Each map's (rows, columns) within a segment's (Q, K) probabilities; Q = [read ; tokens ; write],
    K = [cache ; read ; tokens ; write]."""
    c, m, n, w = seg["cache"], seg["read"], seg["tokens"], seg["write"]
    out = {}
    if w:
        out["write"] = (slice(m + n, m + n + w), slice(c, c + m + n + w))
    if m:
        out["read"] = (slice(m, m + n), slice(c, c + m))
    if c:
        out["cache"] = (slice(m, m + n), slice(0, c))
    return out


def write_order(prob: np.ndarray, seg: dict) -> list[float]:
    """Per layer: Spearman's rank correlation between write slot j and the token position it attends to most.
    prob (L, Q_write, K) of the write map (columns [read ; tokens ; write])."""
    m, n = seg["read"], seg["tokens"]
    out = []
    for layer in prob:
        top = layer[:, m : m + n].argmax(1).astype(float)  # per slot, the most attended token position
        slots = np.arange(len(top), dtype=float)
        ranks = np.argsort(np.argsort(top, kind="stable"), kind="stable").astype(float)
        out.append(float(np.corrcoef(slots, ranks)[0, 1]) if ranks.std() > 0 else 0.0)
    return out


def labels(seg: dict, kind: str, names: list[str] | None) -> tuple[list[str], list[str]]:
    """Row and column labels of a map: memory slots as r0.. / w0.., cache positions as c0.., tokens by their
    symbol (one example) or position (a mean)."""
    tokens = names or [f"t{i}" for i in range(seg["tokens"])]
    read, write = [f"r{i}" for i in range(seg["read"])], [f"w{i}" for i in range(seg["write"])]
    cache = [f"c{i}" for i in range(seg["cache"])]
    rows = write if kind == "write" else tokens
    cols = {"write": read + tokens + write, "read": read, "cache": cache}[kind]
    return rows, cols


def draw(prob: np.ndarray, rows: list[str], cols: list[str], bounds: list[int], title: str, path: Path) -> bool:
    """prob (panels, R, C) as a row of heat maps (one per layer, or per layer and head), block boundaries
    marked; False without matplotlib (the `report` extra)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = prob.shape[0]
    ncols = min(panels, 3)
    nrows = -(-panels // ncols)
    width, height = min(2.5 + 0.14 * len(cols), 6.5), min(1.6 + 0.16 * len(rows), 6.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.5), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:panels]):
        image = ax.imshow(prob[i], cmap="viridis", vmin=0.0, vmax=max(float(prob[i].max()), 1e-6), aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        for b in bounds:
            ax.axvline(b - 0.5, color="white", lw=0.8)
        small = len(cols) <= 64 and len(rows) <= 64
        ax.set_xticks(range(len(cols)) if small else [])
        ax.set_xticklabels(cols if small else [], fontsize=5, rotation=90)
        ax.set_yticks(range(len(rows)) if small else [])
        ax.set_yticklabels(rows if small else [], fontsize=5)
        ax.set_title(f"layer {i}" if panels > 1 else "", fontsize=7)
        ax.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def inspect(run_dir: Path, out: Path, examples: int, example: int | None, heads: bool, split: str) -> dict:
    """Captures, draws and saves every map of every segment -> the inspect.json record."""
    cfg, task, model = open_run(run_dir)
    if cfg.model.hf_name is not None:
        raise ConfigError("backbone", f"{run_dir} wraps a Hugging Face model (backbone=hf), whose attention "
                          "probabilities rmt-bench-inspect cannot capture; it reads the own backbone's")  # fmt: skip
    if not hasattr(task, "splits"):
        raise ConfigError("task", f"inspect draws the algorithmic tasks' segments; {task.name} is a stream")
    data = task.splits[split]
    rows_of = slice(example, example + 1) if example is not None else slice(0, examples)
    inputs = data.inputs[rows_of]
    names = None
    if example is not None:
        if example >= data.inputs.shape[0]:
            raise ConfigError("--example", f"{example} is past the {data.inputs.shape[0]} {split} examples")
        names = [task.token_name(int(t)) for t in inputs[0].flatten()]
    out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run_dir), "model": cfg.model.name, "task": cfg.task.name, "split": split,
              "examples": int(inputs.shape[0]), "example": example, "segments": [], "files": []}  # fmt: skip
    for s, seg in enumerate(capture(model, inputs, task.pad_front)):
        prob = seg["prob"].mean(1)  # over examples: (L, H, Q, K)
        n = seg["tokens"]
        seg_names = names[s * n : (s + 1) * n] if names else None
        entry = {"segment": s, "cache": seg["cache"], "read": seg["read"], "write": seg["write"]}
        for kind, (r, c) in blocks(seg).items():
            part = prob[:, :, r, c].numpy()  # (L, H, R, C)
            rows, cols = labels(seg, kind, seg_names)
            bounds = [seg["read"], seg["read"] + n] if kind == "write" else []
            stem = out / f"{kind}_seg{s}"
            np.savez(stem.with_suffix(".npz"), prob=part, prob_mean_heads=part.mean(1), rows=rows, cols=cols,
                     cache=seg["cache"], read=seg["read"], tokens=n, write=seg["write"])  # fmt: skip
            what = "mean over heads" + (f" (example {example})" if names else f" ({len(inputs)} examples)")
            title = f"{cfg.model.name} {cfg.task.name}: {kind} map, segment {s}, {what}"
            if draw(part.mean(1), rows, cols, bounds, title, stem.with_suffix(".png")):
                record["files"].append(str(stem.with_suffix(".png")))
            if heads:
                flat = part.reshape(-1, *part.shape[2:])  # (L * H, R, C): layer-major
                if draw(flat, rows, cols, bounds, title.replace("mean over heads", "per head (layer-major)"),
                        out / f"{kind}_seg{s}_heads.png"):  # fmt: skip
                    record["files"].append(str(out / f"{kind}_seg{s}_heads.png"))
            if kind == "write":
                entry["write_order"] = write_order(part.mean(1), seg)
        record["segments"].append(entry)
    (out / "inspect.json").write_text(json.dumps(record, indent=2))
    return record


def log_to_wandb(record: dict, run_dir: Path, mode: str) -> str:
    """The images into one W&B run of job type "inspect" in the run's group."""
    import wandb

    cfg = json.loads((run_dir / "config.json").read_text())
    run = wandb.init(project=cfg["logger"]["project"], group=cfg["logger"].get("group") or cfg["task"]["name"],
                     job_type="inspect", dir=str(run_dir), mode=mode, config={"inspected": record["run"]},
                     settings=wandb.Settings(silent=True, console="off"))  # fmt: skip
    run.log({Path(f).stem: wandb.Image(f) for f in record["files"]})
    run.summary.update({f"write_order/seg{e['segment']}": e.get("write_order") for e in record["segments"]})
    where = Path(run.dir).parent
    run.finish()
    return str(where)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rmt-bench-inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (config.json, checkpoint.pt)")
    parser.add_argument("--examples", type=int, default=100, help="examples averaged over (default 100)")
    parser.add_argument("--example", type=int, default=None, help="one example instead, its tokens on the axes")
    parser.add_argument("--heads", action="store_true", help="every head as well as their mean")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--out", type=Path, default=None, help="where the files go (default RUN_DIR/inspect)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                        help="log the images to W&B (default: the run's logger, WANDB_MODE winning)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.examples < 1:
            raise ConfigError("--examples", f"must be >= 1, got {args.examples}")
        record = inspect(args.run_dir, args.out or args.run_dir / "inspect", args.examples, args.example,
                         args.heads, args.split)  # fmt: skip
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for entry in record["segments"]:
        order = ", ".join(f"{v:+.2f}" for v in entry.get("write_order", []))
        print(f"segment {entry['segment']}: write order by layer {order or '-'}")
    print(f"-> {len(record['files'])} figures and their .npz in {args.out or args.run_dir / 'inspect'}")
    logger = json.loads((args.run_dir / "config.json").read_text())["logger"]
    mode = args.wandb or ("disabled" if logger["kind"] == "none" else os.environ.get("WANDB_MODE", logger["mode"]))
    if mode != "disabled" and record["files"]:
        print(f"-> W&B ({mode}): {log_to_wandb(record, args.run_dir, mode)}")


if __name__ == "__main__":
    main()
