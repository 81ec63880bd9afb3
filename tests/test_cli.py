"""The CLI end to end: every config composes and builds, runs and sweeps write their metrics, bad input fails
with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rmt_bench.cli import to_run_config
from rmt_bench.config import CLASSIFY_TASKS, CONFIG_DIR, MODEL_SWITCHES, ModelConfig, model_switches
from rmt_bench.job import CHECKPOINT_FILE, run
from rmt_bench.models import build_model
from rmt_bench.tasks import build_task
from rmt_bench.train.checkpoint import read_checkpoint
from rmt_bench.train.loop import autocast_factory, evaluate
from tests.helpers import TINY, compose_cfg, run_cli

GROUPS = ("task", "model", "backbone", "arch", "trainer", "logger")


def options(group: str) -> list[str]:
    return sorted(
        p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_")
    )  # _base: not a choice


LM_TASKS = ("wikitext103", "enwik8")


def small_task(task: str, tmp_path: Path) -> list[str]:
    """Overrides that make `task` tiny: small splits, or a small corpus written for the LM tasks."""
    if task in LM_TASKS:
        from tests.helpers import write_wikitext

        data = write_wikitext(tmp_path / "wt", lines_per_split=(60, 12, 12))
        return [
            f"task={task}",
            f"task.data_dir={data}",
            f"task.cache_dir={tmp_path}/cache",
            "task.segment_len=4",
            "task.level=word",
        ]
    return [f"task={task}", "task.train_size=64", "task.valid_size=16", "task.test_size=16"]


@pytest.mark.parametrize("model", options("model"))
def test_model_presets_are_the_one_name_to_switches_mapping(model):
    """configs/model/<name>.yaml with mem=7 sets exactly the switches `model_switches` gives (tests and scripts
    build models from it): every switch key equals, the rest stays at the base."""
    cfg = to_run_config(compose_cfg([f"model={model}", "mem=7", "backbone=tiny"])).model
    base = ModelConfig()
    expected = model_switches(model, 7)
    for key in ("name", "num_mem_tokens", "recurrent_memory", "mem_len"):
        assert getattr(cfg, key) == expected.get(key, getattr(base, key) if key != "name" else None), key
    assert set(MODEL_SWITCHES) == set(options("model"))


# the classification task reads text with a Hugging Face tokenizer and a wrapped model: tests/test_hyperpartisan.py
TOKEN_TASKS = [t for t in options("task") if t not in CLASSIFY_TASKS]


@pytest.mark.parametrize("task", TOKEN_TASKS)
@pytest.mark.parametrize("model", options("model"))
def test_every_task_and_model_composes_and_builds(tmp_path, task, model):
    cfg = to_run_config(compose_cfg([*small_task(task, tmp_path), f"model={model}", "backbone=tiny"]))
    built = build_model(cfg.model, build_task(cfg.task).vocab_size)
    assert cfg.model.name == model and cfg.task.name == task
    assert to_run_config(compose_cfg([f"task={task}", f"model={model}"])).model.n_layer >= 4  # the paper's sizes
    assert sum(p.numel() for p in built.parameters()) > 0


@pytest.mark.parametrize("group", ["backbone", "arch", "trainer", "logger", "experiment"])
def test_every_other_config_composes(group):
    for option in options(group):
        # backbone=hf names a model; backbone=hyperpartisan (a wrapped encoder) answers one token at the end
        needs = {"hf": ["model.hf_name=gpt2"], "hyperpartisan": ["task=facts"]}
        named = needs.get(option, []) if group == "backbone" else []
        cfg = to_run_config(compose_cfg([f"{group}={option}", *named]))
        assert cfg is not None


@pytest.mark.parametrize("group", ["backbone", "model", "trainer", "task", "logger"])
def test_presets_are_deltas_of_one_base_file(group):
    """Every preset of the group starts from its `_base.yaml` (directly or through another preset) and sets only
    keys that the base has: a full copy, or a key the base lacks, fails here."""
    import yaml

    folder = Path(CONFIG_DIR) / group
    bases = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("_*base.yaml")}  # task: _base, _lm_base
    for option in options(group):
        data = yaml.safe_load((folder / f"{option}.yaml").read_text()) or {}
        parents = [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        assert parents and all(p in bases or p in options(group) for p in parents), option
        base = bases[next(p for p in parents if p in bases)] if any(p in bases for p in parents) else bases["_base"]
        base = base.get(group, base)  # trainer/_base.yaml is `_global_`: its keys sit under `trainer:`
        own = data.get(group, data) if group == "trainer" else data
        keys = set(own) - {"defaults", "model"}
        assert keys <= set(base), (option, keys - set(base))
        assert len(keys) < len(base), (option, "a full copy of the base")


def test_the_trainer_base_holds_the_papers_schedule():
    """PAPER.md, algorithmic tasks: Adam, lr 1e-4 constant, halved on plateau, clip 0.25, batch 32."""
    t = to_run_config(compose_cfg(["trainer=paper"])).trainer
    assert (t.optimizer, t.lr, t.schedule, t.plateau_factor, t.grad_clip, t.batch_size, t.max_steps) == (
        "adam",
        1e-4,
        "plateau",
        0.5,
        0.25,
        32,
        250_000,
    )
    lm = to_run_config(compose_cfg(["trainer=lm_paper", "task=wikitext103"])).trainer
    assert (lm.optimizer, lm.lr, lm.schedule, lm.grad_clip, lm.batch_size, lm.max_steps) == (
        "adam",
        2.5e-4,
        "cosine",
        0.25,
        60,
        200_000,
    )


def test_paper_sizes_per_task():
    """App. A: 4/128/4/64/256 on copy and reverse (about 923k parameters with 10 symbols), 6/64/4/32/128 on
    retrieval (349k)."""
    for task, layers, d_model, params in [("reverse", 4, 128, 0.92e6), ("retrieval", 6, 64, 0.35e6)]:
        cfg = to_run_config(compose_cfg([f"task={task}", "model=vanilla", "task.train_size=8"]))
        model = build_model(cfg.model, build_task(cfg.task).vocab_size)
        assert (cfg.model.n_layer, cfg.model.d_model) == (layers, d_model)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - params) / params < 0.1, n


@pytest.mark.parametrize(
    ("args", "arch", "pre_lnorm", "init_std"),
    [
        ([], "trainable", True, (2 / 640) ** 0.5),  # the CPU presets: pre-LN, init scaled to the width
        (["task=retrieval"], "trainable", True, (2 / 320) ** 0.5),
        (["trainer=cpu"], "trainable", True, (2 / 640) ** 0.5),
        (["trainer=paper"], "paper", False, 0.02),  # App. A exactly
        (["trainer=lm_paper", "task=wikitext103"], "paper", False, 0.02),
        (["trainer=paper", "arch=trainable"], "trainable", True, (2 / 640) ** 0.5),  # the command line wins
        (["arch=paper"], "paper", False, 0.02),
    ],
)
def test_arch_sets_the_backbone_style(args, arch, pre_lnorm, init_std):
    cfg = to_run_config(compose_cfg(args)).model
    assert (cfg.arch, cfg.pre_lnorm) == (arch, pre_lnorm) and abs(cfg.init_std - init_std) < 1e-6


def test_cpu_presets_drop_dropout_and_stop_early_while_the_paper_keeps_both():
    cpu, paper = (to_run_config(compose_cfg([f"trainer={t}"])) for t in ("default", "paper"))
    assert (cpu.model.dropout, cpu.trainer.grad_clip, cpu.trainer.early_stop_acc) == (0.0, 1.0, 0.998)
    assert (paper.model.dropout, paper.trainer.grad_clip, paper.trainer.early_stop_acc) == (0.1, 0.25, None)
    assert cpu.trainer.max_minutes == 8 and paper.trainer.max_minutes is None


def test_arch_builds_the_modules_it_names():
    """trainable: pre-LN blocks with a final norm and weights of std sqrt(2 / (5 d_model)); paper: post-LN, 0.02."""
    from torch import nn

    for arch, std, final in (("trainable", (2 / 640) ** 0.5, nn.LayerNorm), ("paper", 0.02, nn.Identity)):
        cfg = to_run_config(compose_cfg([f"arch={arch}", "task.train_size=8"]))
        model = build_model(cfg.model, build_task(cfg.task).vocab_size)
        assert isinstance(model.backbone.final_norm, final) and model.backbone.layers[0].pre_lnorm == (arch != "paper")
        weight = model.backbone.layers[0].ff.net[0].weight  # 256 x 128 draws
        assert abs(weight.std().item() - std) / std < 0.05, (arch, weight.std().item())


def test_mem_sets_memory_tokens():
    assert to_run_config(compose_cfg(["model=rmt", "mem=12"])).model.num_mem_tokens == 12


def test_single_run_writes_metrics_and_summary(tmp_path):
    res = run_cli(*TINY, "model=rmt", "mem=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/acc" in x for x in lines)
    assert any("test/acc" in x for x in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test/acc"] <= 1.0 and summary["steps"] == 6 and summary["model"] == "rmt"
    assert summary["arch"] == "trainable" and summary["budget_steps"] == 6 and summary["precision"] == "fp32"
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["model"]["arch"] == "trainable" and resolved["model"]["pre_lnorm"] is True
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("reverse rmt mem=2") and "test acc" in last


def test_multirun_writes_every_job(tmp_path):
    res = run_cli("-m", *TINY, "model=vanilla,rmt", "mem=2", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summaries = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["model"] for p in summaries} == {"vanilla", "rmt"}
    assert all((p.parent / "metrics.jsonl").stat().st_size > 0 for p in summaries)
    assert {p.parent.name for p in summaries} == {"0_model=vanilla", "1_model=rmt"}  # the swept key only
    # each job's summary line: the memory size only for the model that has memory
    lines = [line for line in res.stdout.splitlines() if line.startswith("reverse ")]
    assert [line.split(" |")[0] for line in lines] == [
        "reverse vanilla segments=4 seed=0",
        "reverse rmt mem=2 segments=4 seed=0",
    ]


def test_a_sweep_with_bad_values_names_every_bad_job_and_runs_nothing(tmp_path):
    res = run_cli("-m", *TINY, "model.n_layer=0,2,-1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "error: job 0 (model.n_layer=0): model.n_layer: must be >= 1, got 0"
    assert lines[1] == "error: job 2 (model.n_layer=-1): model.n_layer: must be >= 1, got -1"
    assert len(lines) == 3 and "nothing was run" in lines[2]
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_goes_on_after_a_job_fails_and_lists_it_at_the_end(tmp_path):
    """The middle job asks to resume a run that has no checkpoint: it fails at run time, the last job runs."""
    res = run_cli("-m", *TINY, "resume=false,true,false", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 1
    sweep = tmp_path / "sweep"
    assert (sweep / "0_resume=False" / "summary.json").exists() and (sweep / "2_resume=False" / "summary.json").exists()
    assert not (sweep / "1_resume=True" / "summary.json").exists()
    tail = res.stderr.strip().splitlines()[-2:]
    assert tail[0] == "error: 1 job(s) of the sweep failed:"
    assert tail[1].startswith("  job 1 (resume=True) failed: resume: no checkpoint")
    assert (sweep / "failed_jobs.txt").read_text().startswith("job 1 (resume=True) failed")


def test_wandb_offline_needs_no_network(tmp_path):
    args = [a for a in TINY if a != "logger=none"]
    res = run_cli(*args, "logger=wandb", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    assert (tmp_path / "run" / "summary.json").exists()


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file, which wandb's Python API does not read: a `:W&B` header of
    7 bytes, then LevelDB's log format (32 KiB blocks of chunks: crc 4, length 2, type 1 = full, 2-4 = first,
    middle, last), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_run_has_tags_group_job_type_choices_and_best_summaries(tmp_path):
    """What the dashboard groups and filters by, read back from the offline run's records."""
    args = [a for a in TINY if a != "logger=none"]
    res = run_cli(*args, "logger=wandb", "model=xl", "mem=3", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert list(run_record.tags) == ["reverse", "xl", "trainable"]
    assert run_record.run_group == "reverse" and run_record.job_type == "train"
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["choices"]["model"] == "xl" and config["choices"]["backbone"] == "tiny"
    summaries = {r.metric.name: r.metric.summary for r in records if r.WhichOneof("record_type") == "metric"}
    # the task's MetricSpec: every metric of its evaluation, each kept at its best (and nothing else)
    directions = {name: ("max" if s.max else "min" if s.min else "") for name, s in summaries.items()}
    assert directions == {"val/loss": "min", "val/acc": "max", "val/acc_tf": "max", "val/exact": "max"}
    logged = {(r.history.step.num, "/".join(i.nested_key) or i.key): json.loads(i.value_json)
              for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}  # fmt: skip
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [(m["step"], m["val/acc"]) for m in metrics if "val/acc" in m]
    assert validations and all(logged[step, "val/acc"] == acc for step, acc in validations)


def test_a_resumed_run_continues_its_wandb_run_and_the_console_is_captured(tmp_path):
    args = [
        *(a for a in TINY if a != "logger=none"),
        "logger=wandb",
        "trainer.max_minutes=null",
        "trainer.eval_every=3",
    ]
    run_dir = tmp_path / "run"
    first = run_cli(*args, "trainer.max_steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = (run_dir / "wandb_id.txt").read_text()
    again = run_cli(*args, "trainer.max_steps=9", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run, continued
    console = (runs[-1] / "files" / "output.log").read_text()  # the console, captured
    assert "resumed from" in console and "step 9/9" in console
    choices = json.loads((run_dir / "config.json").read_text())["choices"]
    assert choices["model"] == "rmt" and choices["backbone"] == "tiny" and choices["trainer"] == "default"


def test_online_wandb_without_a_server_falls_back_to_offline_at_once(tmp_path):
    """An unreachable server (a closed local port): one warning line, an offline run to sync later, no wait."""
    args = [*(a for a in TINY if a != "logger=none"), "logger=wandb", "logger.log_checkpoint=true"]
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    res = run_cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the W&B server does not answer; logging offline to {tmp_path}/run/wandb "
                        "(`wandb sync` uploads it later)"]  # fmt: skip
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


def test_a_failing_wandb_keeps_local_metrics(tmp_path):
    """wandb cannot write its run (its directory is taken by a file): one warning line, the run goes on."""
    args = [a for a in TINY if a != "logger=none"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("a file where wandb's directory would go")
    res = run_cli(*args, "logger=wandb", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "wandb failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb failed to start (NotADirectoryError")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_cfg_job_resolve_shows_the_config(tmp_path):
    res = run_cli("--cfg", "job", "--resolve", "mem=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "num_mem_tokens: 3" in res.stdout


@pytest.mark.parametrize("task", TOKEN_TASKS)
@pytest.mark.parametrize("model", options("model"))
def test_every_model_trains_on_every_task(tmp_path, task, model):
    """A few steps of each model on each task through the same path the CLI takes (in-process, for speed)."""
    tiny = [a for a in TINY if not a.startswith("task.")]
    cfg = to_run_config(
        compose_cfg(
            [
                *tiny,
                *small_task(task, tmp_path),
                f"model={model}",
                "mem=2",
                "trainer.max_steps=3",
                "trainer.eval_batch_size=4",
            ]
        )
    )
    summary = run(cfg, tmp_path)
    assert summary["steps"] == 3 and summary["model"] == model
    assert json.loads((tmp_path / "summary.json").read_text())["test/loss"] == summary["test/loss"]
    # the weights trained, and the summary's test metrics are what the best checkpointed weights give
    task_ = build_task(cfg.task)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, task_.vocab_size, task_.pad_front)
    payload = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    trained = payload["model"]
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items() if v.is_floating_point())
    fresh.load_state_dict(payload["best_model"])
    precision = autocast_factory(torch.device("cpu"), summary["precision"] == "bf16")
    again = evaluate(fresh, task_, "test", cfg.trainer.eval_batch_size, precision)
    assert {f"test/{k}": v for k, v in again.items()} == {k: v for k, v in summary.items() if k.startswith("test/")}


def test_shell_completion_installs_and_completes(tmp_path):
    """Hydra's own flags are left to Hydra: `-sc install=bash` prints the script, a query lists the options."""
    script = run_cli("-sc", "install=bash", cwd=tmp_path)
    assert script.returncode == 0 and "hydra_bash_completion" in script.stdout, script.stderr
    query = run_cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "rmt-bench task="})
    assert query.returncode == 0 and set(query.stdout.split()) >= {f"task={t}" for t in options("task")}
    keys = run_cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "rmt-bench model=r"})
    assert keys.stdout.split() == ["model=rmt", "model=rmt_xl"]


SWEEP_TINY = [*TINY, "trainer.max_minutes=null", "trainer.max_steps=10", "trainer.eval_every=5"]


def test_the_optuna_sweeper_tunes_on_the_best_validation_value_in_the_tasks_direction(tmp_path):
    """hydra/sweeper=tune: each job returns its best validation accuracy (never a test number); Optuna's best
    value is the largest of them for an accuracy task, and the direction follows the task."""
    import yaml

    sweep = tmp_path / "sweep"
    res = run_cli("-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=2", *SWEEP_TINY,
                  "trainer.lr=tag(log, interval(1e-4, 1e-2))", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    vals = [json.loads(p.read_text())["val/best_acc"] for p in sweep.glob("*/summary.json")]
    assert len(vals) == 2 and best == max(vals)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for task, direction in (("reverse", "maximize"), ("quadratic", "maximize"), ("wikitext103", "minimize")):
            cfg = compose("config", [f"task={task}", "hydra/sweeper=tune"], return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == direction


def test_the_joblib_launcher_runs_jobs_side_by_side_with_the_threads_split(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *SWEEP_TINY, "model=vanilla,rmt",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    configs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/config.json"))]
    assert [c["model"]["name"] for c in configs] == ["vanilla", "rmt"]
    assert all(c["trainer"]["num_threads"] == max(1, (os.cpu_count() or 1) // 2) for c in configs)
    assert all((p.parent / "summary.json").exists() for p in sweep.glob("*/config.json"))


def test_a_job_failing_in_a_joblib_worker_fails_the_sweep(tmp_path):
    """The failure happens in a worker process: the sweep still ends with exit status 1 and lists it."""
    sweep = tmp_path / "sweep"
    res = run_cli("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *SWEEP_TINY, "resume=false,true",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 1, res.stderr
    tail = res.stderr.strip().splitlines()[-2:]
    assert tail[0] == "error: 1 job(s) of the sweep failed:", res.stderr
    assert tail[1].startswith("  job 1 (resume=True) failed: resume: no checkpoint")
    assert (sweep / "0_resume=False" / "summary.json").exists()


def test_off_a_terminal_progress_is_one_plain_line_per_log_step(tmp_path):
    """stderr to a file (CI, nohup, SLURM): `step k/budget | loss | lr | tok/s | val ... | ETA` at every log step,
    the budget being the one that stops the run, the last validation value carried forward."""
    import re

    args = [*TINY, "trainer.max_minutes=null", "trainer.log_every=2", "trainer.eval_every=3"]
    res = run_cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("step ")]
    pattern = r"step (\d)/6 \| loss \d\.\d{4} \| lr [\d.e+-]+ \| \d+ tok/s( \| val acc \d\.\d{4})? \| ETA \d+\.\d min"
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["2", "4", "6"], res.stderr
    assert "val acc" not in lines[0] and "val acc" in lines[1]  # the first validation comes at step 3
