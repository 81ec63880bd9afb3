"""`rmt-bench-suite`: one of the paper's benchmarks (a file of `tasks/`) run cell by cell, resumably.

    rmt-bench-suite reverse_fig3 --scale cpu            # or a path to a benchmark file
    rmt-bench-suite reverse_fig3 --scale cpu --jobs 2   # two cells side by side, the threads split between them
    rmt-bench-suite --list

A benchmark file holds the paper's table or figure as data: `base` overrides, one list of overrides per `scale`
(`cpu`: the trainable backbone, minutes per cell; `paper`: the paper's backbone and schedule, for a GPU), `seeds`,
and `cells`, each a mapping of override keys to values, its paper number (`paper`), overrides per scale
(`extra: {cpu: [...]}`, replacing the scale's own for the same key) and, for a cell that exists at some scales only
(one no CPU can train in minutes), the list of them (`scales: [paper]`). A cell may start from another cell's
weights (`after: {keys of that cell}`: a curriculum across runs, e.g. a task without filler, then with it): it gets
`trainer.init_from=` that cell's directory of the same seed, runs once that cell has finished (the suite runs the
cells in waves of such dependencies, and `--only` brings a selected cell's `after` cells along), and does not run
when that cell failed.
Every cell runs through the same entry point as `rmt-bench` (`python -m rmt_bench.cli ...`, so Hydra stays in
cli.py) in a directory that depends only on the cell: `<out>/<benchmark>/<scale>/<cell keys>/seed<k>`. A cell is
finished when its summary.json exists: a re-run skips it, and resumes (`resume=true`) a cell that has only a
checkpoint. Every cell's config is validated before the first starts; a cell that fails at run time is reported
and the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

_PACKAGED = Path(__file__).resolve().parent / "benchmarks"  # tasks/, inside an installed wheel
BENCHMARK_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "tasks"
# a cell's paper number; its overrides per scale; where the figure places it when its own keys do not say (`x`:
# e.g. the paper's segment label of a cell that the official code split otherwise); a label of its split (`split`)
# the cell's own seeds, when they differ from the file's (`seeds`); the scales the cell exists at, when not all
CELL_KEYS_RESERVED = ("paper", "extra", "x", "split", "seeds", "scales", "after")


class SuiteError(Exception):
    """Bad benchmark name, file or scale: one line."""


@dataclass
class Cell:
    name: str  # directory name: the cell's own `key=value`s
    overrides: list[str]  # base + scale + the cell's, without seed and run dir
    seed: int
    paper: float | None
    keys: dict  # the cell's own keys and values, as in the benchmark file
    x: object = None  # the figure's x for this cell, if the file gives one (else the value of the file's `x` key)
    split: str | None = None  # a label of how the cell splits the task (a series of its own in the report)
    settings: tuple[str, ...] = ()  # the benchmark file's overrides of the cell (no command-line ones)
    after: str | None = None  # the name of the cell whose weights (same seed) this one starts from

    def run_dir(self, root: Path) -> Path:
        return root / self.name / f"seed{self.seed}"


def available() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def load(name: str) -> tuple[str, dict]:
    """A benchmark by name (tasks/NAME.yaml) or path -> (its name, its contents)."""
    path = Path(name)
    if not path.suffix:
        path = BENCHMARK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SuiteError(f"benchmark {name}: no such file; choose one of: {', '.join(available())} (or a path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    for key in ("cells", "scales", "seeds", "metric"):
        if not isinstance(data, dict) or key not in data:
            raise SuiteError(f"{path}: missing `{key}`")
    return path.stem, data


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def cells(data: dict, scale: str, extra: list[str] = ()) -> list[Cell]:
    """Every (cell, seed) of the benchmark at `scale`; `extra` overrides (the command line's) come last and replace
    any override of the same key (e.g. `trainer.device=cuda`, `task.data_dir=DIR`)."""
    if scale not in data["scales"]:
        raise SuiteError(f"--scale {scale}: not in this benchmark; choose one of: {', '.join(data['scales'])}")
    out = []
    for spec in data["cells"]:
        own = {k: v for k, v in spec.items() if k not in CELL_KEYS_RESERVED}
        name = _name(own)
        at = spec.get("scales", list(data["scales"]))
        if not isinstance(at, list) or not at or any(s not in data["scales"] for s in at):
            raise SuiteError(f"cell {name}: scales: {at}: expected a list of this benchmark's scales "
                             f"({', '.join(data['scales'])})")  # fmt: skip
        if scale not in at:
            continue
        # base, the scale's, the cell's extras for the scale, the cell's keys, the command line's: the last one of
        # a key wins (Hydra would refuse the same key twice)
        layers = [
            data.get("base", []), data["scales"][scale], (spec.get("extra") or {}).get(scale, []),
            [f"{k}={_value(v)}" for k, v in own.items()], [f"scale={scale}"], list(extra),
        ]  # fmt: skip
        merged = {}
        for override in (o for layer in layers for o in layer):
            merged.pop(_key(override), None)
            merged[_key(override)] = override
        from_file = {o for layer in layers[:-1] for o in layer}  # every layer but the command line's
        settings = tuple(o for o in merged.values() if o in from_file)
        after = _name(spec["after"]) if spec.get("after") else None
        out += [Cell(name, list(merged.values()), seed, spec.get("paper"), own, spec.get("x"), spec.get("split"),
                     settings, after) for seed in spec.get("seeds", data["seeds"])]  # fmt: skip
    there = {(c.name, c.seed) for c in out}
    for c in out:
        if c.after is not None and (c.after, c.seed) not in there:
            raise SuiteError(f"cell {c.name}: after: no cell {c.after} with seed {c.seed} at scale {scale}")
    for c in out:
        depth(c, out)  # no cycles
    return out


def _name(own: dict) -> str:
    """A cell's directory name: its own `key=value`s."""
    return ",".join(f"{k}={v}" for k, v in own.items()).replace("/", "_")


def depth(cell: Cell, every: list[Cell]) -> int:
    """How many `after` cells stand before this one (0: none): the wave it runs in."""
    by_key, seen, n = {(c.name, c.seed): c for c in every}, {(cell.name, cell.seed)}, 0
    while cell.after is not None:
        cell, n = by_key[(cell.after, cell.seed)], n + 1
        if (cell.name, cell.seed) in seen:
            raise SuiteError(f"cell {cell.name}: after: a cycle of cells that start from each other")
        seen.add((cell.name, cell.seed))
    return n


def with_after(todo: list[Cell], every: list[Cell]) -> list[Cell]:
    """The selected cells and, before them, the cells they start from (those --only left out)."""
    by_key, out = {(c.name, c.seed): c for c in every}, list(todo)
    for c in todo:
        while c.after is not None:
            c = by_key[(c.after, c.seed)]
            if c not in out:
                out.insert(0, c)
    return out


def _value(v) -> str:
    """A cell's value as Hydra reads it back: lists as [a,b] (nested: [[a,b],[c,d]]), the rest as written."""
    return "[" + ",".join(map(_value, v)) + "]" if isinstance(v, list) else str(v)


def select(todo: list[Cell], data: dict, only: list[str]) -> list[Cell]:
    """The cells whose keys match every `KEY=V1,V2` of --only (e.g. `task.segments=3,6`)."""
    keys = {k for spec in data["cells"] for k in spec if k not in CELL_KEYS_RESERVED}
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or key not in keys:
            raise SuiteError(f"--only {item}: expected KEY=V1[,V2...] with KEY one of: {', '.join(sorted(keys))}")
        allowed = set(values.split(","))
        todo = [c for c in todo if str(c.keys.get(key)) in allowed]
    if not todo:
        raise SuiteError(f"--only {' '.join(only)}: no cell matches")
    return todo


def status(cell: Cell, root: Path) -> str:
    """finished (summary.json), partial (a checkpoint only) or new; stale: finished with other settings than the
    benchmark file gives the cell now (its .hydra/overrides.yaml), so its result is not this file's."""
    d = cell.run_dir(root)
    if (d / "summary.json").exists():
        return "stale" if changed_settings(cell, d) else "finished"
    return "partial" if (d / "checkpoint.pt").exists() else "new"


def changed_settings(cell: Cell, run_dir: Path) -> list[str]:
    """The cell's overrides of the benchmark file that its finished run did not have (as `key=now (then: was)`)."""
    recorded_file = run_dir / ".hydra" / "overrides.yaml"
    if not recorded_file.is_file():
        return []
    recorded = {_key(o): o for o in yaml.safe_load(recorded_file.read_text()) or []}
    return [f"{o} (then: {recorded.get(_key(o), 'not set')})" for o in cell.settings if recorded.get(_key(o)) != o]


def command(cell: Cell, root: Path, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "rmt_bench.cli", *cell.overrides, f"seed={cell.seed}"]
    if threads:
        cmd.append(f"trainer.num_threads={threads}")
    if status(cell, root) == "partial":
        cmd.append("resume=true")
    if cell.after is not None:  # the weights of the cell it starts from, the same seed
        cmd.append(f"trainer.init_from={_quoted(root / cell.after / f'seed{cell.seed}')}")
    return [*cmd, f"hydra.run.dir={_quoted(cell.run_dir(root))}"]


def _quoted(path: Path) -> str:
    """A path quoted for Hydra's grammar: the cell names hold `=` and `,`."""
    quote = '"' if "'" in str(path) else "'"
    return f"{quote}{path}{quote}"


def say(line: str) -> None:
    """One whole line at once: cells started by worker threads must not split the progress lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_cell(cell: Cell, root: Path, threads: int | None) -> tuple[int, str]:
    """Runs one cell, its output in <run dir>/suite.log -> (exit status, the run's last line)."""
    d = cell.run_dir(root)
    say(f"  {'resuming' if status(cell, root) == 'partial' else 'starting'} {cell.name} seed {cell.seed}")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "suite.log", "a") as log:
        res = subprocess.run(command(cell, root, threads), stdout=log, stderr=subprocess.STDOUT)
    lines = (d / "suite.log").read_text().strip().splitlines()
    return res.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rmt-bench-suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", nargs="?", help="a name from tasks/ (see --list) or a path")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every cell, last word on their keys (task.data_dir=DIR)"
    )
    parser.add_argument("--scale", default="cpu", help="cpu (minutes per cell) or paper (the paper's schedule)")
    parser.add_argument("--out", default="suite", help="root of the cell directories (default: ./suite)")
    parser.add_argument("--jobs", type=int, default=1, help="cells side by side; the CPU threads split between them")
    parser.add_argument(
        "--only", action="append", default=[], metavar="KEY=V1,V2", help="run only the cells with these values"
    )
    parser.add_argument("--list", action="store_true", help="the benchmarks and their cells, then exit")
    parser.add_argument("--dry-run", action="store_true", help="print each cell's command and status, run nothing")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        if args.list or not args.benchmark:
            for name in available():
                _, data = load(name)
                print(f"{name}: {data.get('title', '')} ({len(data['cells'])} cells x {len(data['seeds'])} seeds)")
            return
        if args.jobs < 1:
            raise SuiteError(f"--jobs {args.jobs}: must be >= 1")
        name, data = load(args.benchmark)
        every = cells(data, args.scale, args.overrides)
        todo = with_after(select(every, data, args.only), every) if args.only else every
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

    from rmt_bench.failures import exit_if_failed
    from rmt_bench.overrides import invalid_jobs  # Hydra composes the configs, at the command-line edge

    bad = invalid_jobs([(c.overrides + [f"seed={c.seed}"], f"{c.name} seed {c.seed}") for c in todo])
    if bad:
        for _, label, what in bad:
            print(f"error: cell {label}: {what}", file=sys.stderr)
        sys.exit(2)
    root = Path(args.out) / name / args.scale
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    stale = [c for c in todo if status(c, root) == "stale"]
    if stale and not args.dry_run:
        for c in stale:
            print(f"error: cell {c.name} seed {c.seed}: finished with other settings than the benchmark's now: "
                  f"{'; '.join(changed_settings(c, c.run_dir(root)))}; move {c.run_dir(root)} away (or use another "
                  "--out) to run it again", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    pending = [c for c in todo if status(c, root) != "finished"]
    total = len(todo)
    if data.get("note"):
        print(f"{name}: {data['note']}")
    print(f"{name} ({args.scale}): {total} cells, {total - len(pending)} finished, {len(pending)} to run -> {root}")
    if args.dry_run:
        for c in todo:
            print(f"[{status(c, root)}] {' '.join(command(c, root, threads)[3:])}")
        return
    root.mkdir(parents=True, exist_ok=True)
    # the benchmark travels with its runs: rmt-bench-report reads the cells and paper numbers from there
    (root.parent / "benchmark.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    done, failed, start = total - len(pending), [], time.perf_counter()
    broken: set[tuple[str, int]] = set()  # cells that failed: those that start from them do not run
    waves = sorted({depth(c, todo) for c in pending})
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for wave in waves:  # a cell runs after the cells it starts from (`after`)
            futures = {}
            for c in (c for c in pending if depth(c, todo) == wave):
                if (c.after, c.seed) in broken:
                    broken.add((c.name, c.seed))
                    done += 1
                    failed.append(f"{c.name} seed {c.seed}: not run, the cell it starts from ({c.after}) failed")
                    say(f"[{done}/{total}] {c.name} seed {c.seed} | NOT RUN (its after cell {c.after} failed)")
                    continue
                futures[pool.submit(run_cell, c, root, threads)] = c
            for fut in as_completed(futures):
                c = futures[fut]
                code, last = fut.result()
                done += 1
                minutes = (time.perf_counter() - start) / 60
                if code:
                    broken.add((c.name, c.seed))
                    failed.append(f"{c.name} seed {c.seed} (exit {code}): {last}")
                verdict = last if not code else f"FAILED (exit {code}; {c.run_dir(root) / 'suite.log'})"
                say(f"[{done}/{total}] {minutes:.1f} min | {c.name} seed {c.seed} | {verdict}")
    exit_if_failed("cell(s)", failed)


if __name__ == "__main__":
    main()
