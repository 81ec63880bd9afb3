"""A curriculum over the task's settings: stages of a task key (pairs, sequence length, segments) that the loop
consults at every step (`trainer.curriculum`; PAPER.md: the follow-up and BABILong / ARMT train memory this way).

The stages are task configs (`CurriculumConfig.settings`), the task's own the last. Stage i trains on batches of
its own setting; its own validation set (`valid_size` examples) decides when the next stage starts: at
`threshold` greedy accuracy, or after `max_stage_steps`. Each stage continues from the last one's weights and
optimiser; the step budget and the learning-rate schedule span all stages. The stage lives in `TrainState`
(`stage`, `stage_starts`), so it is checkpointed and a resumed run continues it exactly: a step's batch depends on
(seed, step, stage) only. The validation at the task's own setting (best weights, early stop) and the test are
the loop's, as without a curriculum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from rmt_bench.config import CurriculumConfig
from rmt_bench.tasks import AlgorithmicTask, Batch, build_task


class Curriculum:
    """The stages of a run; `final` is the task at its own setting (the last stage)."""

    def __init__(self, cfg: CurriculumConfig, final: AlgorithmicTask, device: torch.device | str = "cpu"):
        self.cfg, self.final, self.device = cfg, final, device
        self.settings = cfg.settings(final.cfg)
        self._tasks: dict[int, AlgorithmicTask] = {len(self.settings) - 1: final}

    @property
    def last(self) -> int:
        return len(self.settings) - 1

    def values(self, stage: int) -> dict[str, int]:
        """The curriculum keys' values at `stage`, e.g. {"num_pairs": 4, "segments": 2}."""
        return {key: self.settings[stage].key_value[key] for key in self.cfg.keys}

    def value(self, stage: int) -> str:
        """`stage`'s values as text: `3` for one key, `4,2` for several (in the order of `trainer.curriculum.key`)."""
        return ",".join(str(v) for v in self.values(stage).values())

    def describe(self) -> str:
        """e.g. `num_pairs 1 -> 2 -> 3 -> 4 (next at 0.95, at most 2000 steps a stage)`, for logs and summaries;
        several keys: `num_pairs,segments 1,2 -> 2,2 -> ... -> 4,3`."""
        values = " -> ".join(self.value(i) for i in range(len(self.settings)))
        cap = f", at most {self.cfg.max_stage_steps} steps a stage" if self.cfg.max_stage_steps else ""
        varying = ", varying per batch" if self.cfg.varying else ""
        return f"{','.join(self.cfg.keys)} {values} (next at {self.cfg.threshold:g}{cap}{varying})"

    def task(self, stage: int) -> AlgorithmicTask:
        """Stage `stage`'s task (train and a `valid_size` validation split), built on first use."""
        if stage not in self._tasks:
            setting = replace(self.settings[stage], valid_size=self.cfg.valid_size)
            self._tasks[stage] = build_task(setting, self.device, splits=("train", "valid"))
        return self._tasks[stage]

    def batches(self, st, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless training batches of the stage `st.stage` holds when each is drawn (the loop advances it):
        `batch_size` examples of that stage's training split, drawn with a generator seeded by (seed, step), so a
        resumed run draws the same. `varying`: the batch's stage is drawn uniformly from 0 .. st.stage first."""
        while True:
            if self.cfg.varying:  # the stage, then the rows, from one generator of (seed, step)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + st.step)
                stage = int(torch.randint(0, st.stage + 1, (1,), generator=gen))
                yield self.task(stage).batch_at(st.step, batch_size, seed, gen)
            else:
                yield self.task(st.stage).batch_at(st.step, batch_size, seed)

    def advance(self, st, stage_acc: float) -> bool:
        """Start the next stage if this one's validation accuracy reached the threshold or it used its steps."""
        if st.stage >= self.last:
            return False
        capped = self.cfg.max_stage_steps is not None and st.step - st.stage_starts[-1] >= self.cfg.max_stage_steps
        if stage_acc < self.cfg.threshold and not capped:
            return False
        st.stage += 1
        st.stage_starts.append(st.step)
        return True
