"""`trainer.precision=auto`: bf16 autocast where it is faster than fp32, decided by a measurement, for training
and for evaluation apart.

On a CPU the answer depends on the matrix units, the size of the model and the overhead of the casts, and CPUs that
report the same model name differ (docs/PERFORMANCE.md has the figures), so no flag decides it: the first run on a
machine times a training step of a paper-sized rmt in both precisions (a few seconds) and caches the answer, keyed
by the CPU, the torch version and the thread count, in `$RMT_BENCH_CACHE` (default `~/.cache/rmt-bench`)/
precision.json. Delete the file to measure again. On CUDA, auto is bf16 where the device supports it.

Evaluation is decided by its own measurement, because greedy decoding runs one query position at a time against
large batches of cached keys and values: it is bound by memory traffic and the casts rather than by matrix units,
so it can be slower in bf16 where training is faster. The probe times the greedy decoding of a batch of the reverse
rmt's examples in both precisions. The weights are fp32 either way (autocast casts on the fly), so evaluating in
fp32 a model trained in bf16 autocast is the exact function, not an approximation of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch

SPEEDUP_NEEDED = 1.1  # bf16 must be this much faster to be chosen: casts cost accuracy for nothing otherwise
PROBE_STEPS = 4
PROBE_DECODES, EVAL_BATCH = 2, 250  # greedy decodings timed per precision, at the cpu presets' eval_batch_size


def cache_file() -> Path:
    root = os.environ.get("RMT_BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "rmt-bench"
    return Path(root).expanduser() / "precision.json"


def machine_key() -> str:
    """The CPU (model name and feature flags), torch version and thread count: what the measurement depends on."""
    info = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in info:
                info[key.strip()] = value.strip()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha1(info.get("flags", "").encode()).hexdigest()[:8]
    return f"{cpu} [{flags}] torch {torch.__version__} threads {torch.get_num_threads()}"


class Precision(NamedTuple):
    """What `resolve` decides: bf16 autocast for training, for evaluation, and one line saying why."""

    train_bf16: bool
    eval_bf16: bool
    why: str


def measure_cpu() -> dict:
    """Milliseconds per training step (forward, backward, AdamW) of the paper's reverse rmt (4 layers, d_model
    128, memory 6, 4 segments of 12, batch 32) in fp32 and in bf16 autocast, alternating, best of PROBE_STEPS;
    then per greedy decoding of EVAL_BATCH of its examples (the 24 answer tokens generated one at a time, the
    evaluation of the algorithmic tasks), the same way."""
    from rmt_bench.config import ModelConfig
    from rmt_bench.models import build_model, generate_greedy, train_segments

    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = ModelConfig(name="rmt", num_mem_tokens=6, dropout=0.0, pre_lnorm=True)
        model = build_model(cfg, 12)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(2, 12, (32, 4, 12))
        w = torch.ones(x.shape)
        casts = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
        times = {name: [] for name in casts}
        for i in range(PROBE_STEPS + 1):
            for name, cast in casts.items():
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                train_segments(model, x, x, w, w.sum().item(), -1, autocast=cast, final_state=False)
                opt.step()
                if i:  # the first round warms up
                    times[name].append((time.perf_counter() - start) * 1000)
        model.eval()
        x = torch.randint(2, 12, (EVAL_BATCH, 4, 12))
        answer = torch.zeros(x.shape, dtype=torch.bool)
        answer[:, 1, -1], answer[:, 2:] = True, True  # the prediction at each answer position feeds the next input
        decode = {name: [] for name in casts}
        for i in range(PROBE_DECODES + 1):
            for name, cast in casts.items():
                start = time.perf_counter()
                with cast():
                    generate_greedy(model, x, answer)
                if i:
                    decode[name].append((time.perf_counter() - start) * 1000)
    fp32, bf16 = min(times["fp32"]), min(times["bf16"])
    eval_fp32, eval_bf16 = min(decode["fp32"]), min(decode["bf16"])
    return {
        "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2), "bf16_speedup": round(fp32 / bf16, 3),
        "eval_fp32_ms": round(eval_fp32, 2), "eval_bf16_ms": round(eval_bf16, 2),
        "eval_bf16_speedup": round(eval_fp32 / eval_bf16, 3),
    }  # fmt: skip


def resolve(precision: str, device: torch.device) -> Precision:
    """Training's and evaluation's precision, and one line saying why. fp32 / bf16 are taken as given, for
    both; auto as described above."""
    if precision != "auto":
        bf16 = precision == "bf16"
        return Precision(bf16, bf16, f"precision {precision} (as configured)")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        why = f"precision auto: {'bf16' if bf16 else 'fp32'} (CUDA device {'with' if bf16 else 'without'} bf16)"
        return Precision(bf16, bf16, why)
    if device.type != "cpu":
        return Precision(False, False, f"precision auto: fp32 on {device.type}")
    path, key = cache_file(), machine_key()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    how = f"cached in {path}"
    if not isinstance(entry, dict) or not {"bf16_speedup", "eval_bf16_speedup"} <= entry.keys():
        entry = measure_cpu()  # an entry of an earlier version, without the evaluation's figure, too
        cache[key] = entry
        how = f"measured now, cached in {path}"
        try:  # a read-only home only means measuring again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError as exc:
            how = f"measured now; not cached ({path}: {exc.strerror}), so the next run measures again"
    train, evaluation = (entry[k] >= SPEEDUP_NEEDED for k in ("bf16_speedup", "eval_bf16_speedup"))
    line = (
        f"precision auto: {'bf16' if train else 'fp32'} training, {'bf16' if evaluation else 'fp32'} evaluation "
        f"(in bf16 autocast a training step is {entry['bf16_speedup']:.2f}x fp32 and greedy decoding "
        f"{entry['eval_bf16_speedup']:.2f}x on this CPU; {how})"
    )
    return Precision(train, evaluation, line)
