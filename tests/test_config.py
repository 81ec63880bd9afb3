"""One source of defaults: the dataclasses a script builds equal the base files of configs/, key by key, and the
command line's default composition; each key's two marks (in the cell hash, free on resume) are today's lists."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from rmt_bench.cli import to_run_config
from rmt_bench.config import (
    CONFIG_DIR,
    CurriculumConfig,
    LMTaskConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainerConfig,
    marked_keys,
    width_std,
)
from tests.helpers import compose_cfg


def base(path: str, under: str | None = None) -> dict:
    data = yaml.safe_load((CONFIG_DIR / path).read_text())
    for key in under.split(".") if under else []:
        data = data[key]
    return {k: v for k, v in data.items() if k != "defaults"}


@pytest.mark.parametrize(
    ("cls", "files"),
    [
        (ModelConfig, [("backbone/_base.yaml", None), ("model/_base.yaml", None)]),
        (TaskConfig, [("task/_base.yaml", None)]),
        (LMTaskConfig, [("task/_lm_base.yaml", None)]),
        (TrainerConfig, [("trainer/_base.yaml", "trainer")]),
        (CurriculumConfig, [("trainer/_base.yaml", "trainer.curriculum")]),
        (LoggerConfig, [("logger/_base.yaml", None)]),
    ],
)
def test_a_dataclass_built_as_scripts_do_is_its_base_file_key_by_key(cls, files):
    expected = {}
    for path, under in files:
        expected |= base(path, under)
    built = asdict(cls()) if cls is not ModelConfig else asdict(cls(name="vanilla"))
    if cls is ModelConfig:  # null in the file: the style's (trainable), filled in by the dataclass
        assert expected.pop("pre_lnorm") is None and expected.pop("init_std") is None
        assert built.pop("pre_lnorm") is True and built.pop("init_std") == width_std(expected["d_model"])
    if cls is TrainerConfig:
        built["betas"] = list(built["betas"])
    assert built == expected


def test_the_command_lines_defaults_are_the_dataclasses():
    """`rmt-bench` with nothing changed but the model's switches builds what a script's dataclasses give."""
    cfg = to_run_config(compose_cfg(["model=vanilla", "trainer=paper", "arch=trainable", "logger=wandb"]))
    top = base("config.yaml")
    assert (cfg.seed, cfg.mem, cfg.resume, cfg.scale) == (top["seed"], top["mem"], top["resume"], top["scale"])
    default = RunConfig(ModelConfig(name="vanilla"), TaskConfig(), TrainerConfig(), LoggerConfig())
    assert asdict(cfg) == asdict(default)


def test_the_marks_are_todays_hash_and_resume_lists():
    unhashed = ("seed", "resume", "scale", "logger", "trainer.device", "trainer.num_threads", "trainer.init_from",
                "task.data_dir", "task.cache_dir")  # fmt: skip
    resumable = (
        "resume", "scale", "logger", "trainer.device", "trainer.num_threads", "trainer.max_steps",
        "trainer.max_minutes", "trainer.early_stop_acc", "trainer.memory_reset_control", "trainer.eval_every",
        "trainer.eval_batch_size", "trainer.log_every", "task.data_dir", "task.cache_dir", "task.valid_size",
        "task.test_size", "task.eval_segment_len", "task.eval_mem_len", "task.max_eval_tokens",
    )  # fmt: skip
    logger = {f"logger.{k}" for k in asdict(LoggerConfig())}
    expand = lambda keys: {k for k in keys if k != "logger"} | (logger if "logger" in keys else set())  # noqa: E731
    assert set(marked_keys("hashed", False)) == expand(unhashed)
    assert set(marked_keys("resumable", True)) == expand(resumable)
