"""Every row of docs/BAD_INPUTS.md, run as the user would: the exact line the table promises, on stderr, alone
(no traceback), with the exit status it gives, and nothing lost (a trained run's checkpoint is untouched)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY, run_cli

TABLE = ROOT / "docs" / "BAD_INPUTS.md"
LM_BASE = ["backbone=tiny", "logger=none", "trainer.max_steps=4", "trainer.precision=fp32"]
# | # | kind | `arguments` | set-up | exit | `the line` |  (``the line`` when it holds a backtick)
ROW = re.compile(r"^\| (\d+) \| ([^|]+) \| `([^`]*)` \| ([^|]+) \| (\d+) \| (?:`` (.*) ``|`(.*)`) \|$")


def rows() -> list[tuple]:
    found = [ROW.match(line) for line in TABLE.read_text().splitlines()]
    return [(*(g.strip() for g in m.groups()[:5]), m.group(6) or m.group(7)) for m in found if m]


def run_row(setup: str, args: str, tmp: Path):
    """Prepares the row's set-up in `tmp`, then runs `rmt-bench <base> <args>` there -> (the process, the bytes of
    the trained run's checkpoint before the command, or None)."""
    run_dir, env, before = tmp / "run", {}, None
    words = [w.replace("<tmp>", str(tmp)) for w in args.split()] if args != "-" else []
    if setup == "empty data dir":
        (tmp / "empty").mkdir()
    elif setup in ("corrupt checkpoint", "foreign pickle"):
        run_dir.mkdir()
        if setup == "corrupt checkpoint":
            (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
        else:
            torch.save({"model": {}, "train_state": {}, "payload": Path("x")}, run_dir / "checkpoint.pt")
    elif setup == "trained run":
        assert run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp).returncode == 0
        before = (run_dir / "checkpoint.pt").read_bytes()
    elif setup == "file as run dir":
        run_dir.write_text("a file")
    elif setup.startswith("WANDB_MODE="):
        env["WANDB_MODE"] = setup.split("=", 1)[1]
    base = LM_BASE if "task=wikitext103" in words else TINY
    if "task=hyperpartisan" in words:  # its own task keys and backbone (a wrapped encoder)
        base = [a for a in TINY if not a.startswith(("task.", "backbone="))]
    res = run_cli(*base, *words, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp}/sweep", cwd=tmp, env=env)
    return res, before


def test_the_table_holds_at_least_20_distinct_bad_inputs_of_every_kind():
    table = rows()
    assert len(table) >= 20 and len({r[2] + r[3] for r in table}) == len(table)
    assert {r[1] for r in table} >= {"config value", "combination", "data", "checkpoint", "environment"}


@pytest.mark.parametrize(("num", "kind", "args", "setup", "code", "line"), rows(), ids=[f"row{r[0]}" for r in rows()])
def test_a_bad_input_gives_the_documented_line(tmp_path, num, kind, args, setup, code, line):
    res, before = run_row(setup, args, tmp_path)
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert res.returncode == int(code) and len(lines) == 1, (res.returncode, res.stderr)
    expected = re.escape(line.replace("<tmp>", str(tmp_path))).replace("…", ".*")  # … : numbers that may vary
    assert re.fullmatch(expected, lines[0]), lines[0]
    assert "Traceback" not in res.stderr
    if before is not None:  # nothing lost: the refused resume left the run's checkpoint as it was
        assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
