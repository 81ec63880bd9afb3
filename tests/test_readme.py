"""README's "Use it from Python" block, run as written: it trains, decodes and prints an accuracy far above
chance (0.1: 10 symbols; 0.89-0.96 over seeds 0-2 on the machine it was written on; 0.5 leaves room for others)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_the_python_example_of_the_readme_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    accuracy = float(re.fullmatch(r"greedy answer accuracy (\d\.\d+)\n", res.stdout).group(1))
    assert accuracy >= 0.5
