"""Typed run configuration, validated with one clear sentence per mistake.

`cli.py` turns Hydra's DictConfig into these dataclasses; nothing below this module sees Hydra or OmegaConf.
Every check raises `ConfigError(key, message)`, which the CLI prints as one line: `error: <key>: <message>`.

One source of defaults: the base YAML files of `configs/` (`model/_base.yaml` with `backbone/_base.yaml`,
`task/_base.yaml`, `task/_lm_base.yaml`, `trainer/_base.yaml`, `logger/_base.yaml`, the top keys of `config.yaml`).
The dataclasses declare names, types and checks; `defaults_from` gives their fields the base files' values, so
`ModelConfig(name="rmt", num_mem_tokens=6)` in a script is the model the command line builds by default. Each
field carries two marks (`mark`): whether it is part of a cell's hash, and whether a resume may change it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import yaml

_PACKAGED = Path(__file__).resolve().parent / "configs"  # inside an installed wheel
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs"

MODEL_NAMES = ("vanilla", "memtr", "xl", "rmt", "rmt_xl")
# The one mapping from a model name to its switches, MEM standing for the memory size (`mem=`): configs/model/
# says the same for the command line (a test pins them together); tests and scripts build models from it.
MEM = "mem"
HF_KINDS = ("decoder", "encoder")
MODEL_SWITCHES = {
    "vanilla": {},
    "memtr": {"num_mem_tokens": MEM, "recurrent_memory": False},
    "xl": {"mem_len": MEM},
    "rmt": {"num_mem_tokens": MEM},
    "rmt_xl": {"num_mem_tokens": MEM, "mem_len": MEM},
}
ARCHS = ("paper", "trainable")  # backbone styles (configs/arch/*.yaml): they decide pre_lnorm and init_std
ALGORITHMIC_TASKS = ("copy", "reverse", "retrieval", "quadratic")
LM_TASKS = ("wikitext103", "enwik8")
FACTS_TASKS = ("facts",)
CLASSIFY_TASKS = ("hyperpartisan",)
FACT_VARIANTS = ("memorize", "detect", "reason")
LEVELS = ("word", "char")
PAD_SIDES = ("front", "end")
CURRICULUM_KEYS = ("num_pairs", "length", "segments")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "plateau")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class MetricSpec:
    """What a task's evaluation reports and which way is better: `headline` is the task's main metric (the one
    that picks the best weights, that sweepers optimise and that the summary line and the report show first);
    `higher_is_better` covers every metric the evaluation returns (W&B keeps the best of each as a summary)."""

    headline: str
    higher_is_better: dict[str, bool]

    @property
    def direction(self) -> str:
        """`maximize` or `minimize`, for sweepers."""
        return "maximize" if self.higher_is_better[self.headline] else "minimize"

    def score(self, metrics: dict) -> float:
        """The headline as a value where higher is better (the best validation is the highest)."""
        value = metrics[self.headline]
        return value if self.higher_is_better[self.headline] else -value


ANSWER_METRICS = {"loss": False, "acc": True, "acc_tf": True, "exact": True}  # algorithmic tasks' evaluation


class ConfigError(ValueError):
    """A bad value in the run configuration; `key` is its dotted path (e.g. `model.num_mem_tokens`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"'{value}' is not allowed; choose one of: {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value is None or value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if value is None or not low <= value <= high:
        raise ConfigError(key, f"must be in [{low}, {high}], got {value}")


def base_values(path: str, under: str | None = None) -> dict:
    """The plain values of a base file of `configs/` (`under`: a dotted key's mapping, e.g. `trainer`)."""
    data = yaml.safe_load((CONFIG_DIR / path).read_text()) or {}
    for key in under.split(".") if under else []:
        data = data.get(key, {})
    return {k: v for k, v in data.items() if k != "defaults"}


def mark(hashed: bool = True, resumable: bool = False) -> Field:
    """A config field's two marks: `hashed` (part of the cell's hash: it shapes what the run computes and is the
    same for every seed of a cell) and `resumable` (a resume may change it: budgets, evaluation, logging, places)."""
    return field(metadata={"hashed": hashed, "resumable": resumable})


def defaults_from(*sources: tuple[str, str | None], only: tuple[str, ...] | None = None):
    """Class decorator (under @dataclass): every field (or those in `only`) takes its default from the base files
    `sources` ((path, key) pairs, merged in order). A field the files lack, or a key no field has, is a bug here."""

    def wrap(cls):
        values = {}
        for path, under in sources:
            values |= base_values(path, under)
        names = [n for n in cls.__annotations__ if only is None or n in only]
        missing, extra = set(names) - set(values), set(values) - set(names) if only is None else set()
        if missing or extra:
            raise TypeError(f"{cls.__name__}: fields without a base value {sorted(missing)}, keys without a field "
                            f"{sorted(extra)} ({', '.join(p for p, _ in sources)})")  # fmt: skip
        for name in names:
            f = cls.__dict__.get(name)
            f = f if isinstance(f, Field) else field()
            value = values[name]
            if isinstance(value, (list, dict)):
                f.default, f.default_factory = MISSING, (lambda v=value: copy.deepcopy(v))
            else:
                f.default = value
            setattr(cls, name, f)
        return cls

    return wrap


def model_switches(name: str, mem: int) -> dict:
    """`ModelConfig` keys that make model `name` with memory size `mem` (memory tokens and / or cache length)."""
    _choice("model.name", name, MODEL_NAMES)
    return {"name": name} | {key: mem if value == MEM else value for key, value in MODEL_SWITCHES[name].items()}


@dataclass
@defaults_from(("backbone/_base.yaml", None), ("model/_base.yaml", None))
class ModelConfig:
    """One backbone (a Transformer-XL-style decoder) plus the switches that make the paper's five models.

    vanilla: num_mem_tokens=0, mem_len=0          memtr: num_mem_tokens>0, recurrent_memory=False
    xl:      mem_len>0                            rmt:   num_mem_tokens>=0, recurrent_memory=True
    rmt_xl:  num_mem_tokens>0 and mem_len>=0 (the cache also holds memory-token states; 0 is rmt)
    """

    name: str
    # the backbone style, recorded with every run: `paper` (post-LN, init 0.02, App. A) or `trainable` (pre-LN
    # with a final norm, init sqrt(2 / (5 d_model))); the modules read only pre_lnorm and init_std, which are the
    # style's unless set (None)
    arch: str
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    dropout: float
    dropatt: float
    pre_lnorm: bool | None
    init_std: float | None
    tie_weights: bool
    # Sec. 3: memory tokens [read ; segment ; write]; the write outputs become the next read memory.
    num_mem_tokens: int
    recurrent_memory: bool
    # a learned vector per memory slot added to the carried read memory at every segment (lucidrains'
    # recurrent-memory-transformer-pytorch `read_memory_emb`; not in the paper, off by default: docs/RESULTS.md)
    read_memory_emb: bool
    bptt_depth: int  # -1: full BPTT over the example; k: gradient through k previous segments
    # Transformer-XL cache of the previous `mem_len` hidden states per layer (detached).
    mem_len: int
    read_mem_from_cache: bool
    clamp_len: int
    same_length: bool
    vocab_size: int | None  # None: taken from the task
    # output layer: [] = plain softmax; e.g. [20000, 40000, 200000] = adaptive softmax (WikiText-103)
    adaptive_cutoffs: list[int]
    div_val: int  # adaptive softmax/input: cluster i has dimension d_model / div_val^i
    # a Hugging Face model as the backbone (backbone=hf; rmt_bench/models/hf.py): a Hub name or a local directory;
    # None: the own Transformer-XL backbone (the size keys above); the wrapped model's sizes are its own
    hf_name: str | None
    hf_kind: str  # decoder: [read ; tokens ; write] with the paper's mask; encoder: [CLS] read [SEP] tokens [SEP]

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODEL_NAMES)
        _choice("model.hf_kind", self.hf_kind, HF_KINDS)
        if self.hf_name is not None:
            self._check_hf()
        _choice("model.arch", self.arch, ARCHS)
        if self.pre_lnorm is None:  # the style's
            self.pre_lnorm = self.arch == "trainable"
        if self.init_std is None:
            self.init_std = width_std(self.d_model) if self.arch == "trainable" else 0.02
        for key in ("n_layer", "d_model", "n_head", "d_head", "d_inner"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _in_range("model.dropout", self.dropout, 0.0, 0.99)
        _in_range("model.dropatt", self.dropatt, 0.0, 0.99)
        _at_least("model.init_std", self.init_std, 0.0)
        _at_least("model.num_mem_tokens", self.num_mem_tokens, 0)
        _at_least("model.mem_len", self.mem_len, 0)
        if self.bptt_depth != -1 and self.bptt_depth < 0:
            raise ConfigError("model.bptt_depth", f"must be -1 (full) or >= 0, got {self.bptt_depth}")
        if self.clamp_len != -1 and self.clamp_len < 1:
            raise ConfigError("model.clamp_len", f"must be -1 (off) or >= 1, got {self.clamp_len}")
        if self.vocab_size is not None:
            _at_least("model.vocab_size", self.vocab_size, 2)
        self.adaptive_cutoffs = [int(c) for c in self.adaptive_cutoffs]
        cuts = self.adaptive_cutoffs
        if any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError("model.adaptive_cutoffs", f"must be increasing positive token counts, got {cuts}")
        _at_least("model.div_val", self.div_val, 1)
        if self.div_val > 1 and self.d_model % self.div_val ** len(cuts):
            raise ConfigError("model.div_val", f"d_model {self.d_model} must divide by div_val^{len(cuts)}")
        self._check_switches()

    def _check_switches(self) -> None:
        name, m, c = self.name, self.num_mem_tokens, self.mem_len
        if name == "vanilla" and (m or c):
            raise ConfigError("model.name", "vanilla has no memory tokens and no cache; use memtr, rmt, xl or rmt_xl")
        if name == "xl" and m:
            raise ConfigError("model.num_mem_tokens", "xl has no memory tokens; use model=rmt_xl for both")
        if name in ("rmt", "memtr") and c:
            raise ConfigError("model.mem_len", f"{name} has no cache; use model=rmt_xl for memory tokens plus a cache")
        if name == "memtr" and self.recurrent_memory:
            raise ConfigError("model.recurrent_memory", "memtr carries no memory between segments; must be false")
        if name in ("rmt", "rmt_xl") and not self.recurrent_memory:
            raise ConfigError("model.recurrent_memory", f"{name} carries memory between segments; must be true")
        if name == "memtr" and m == 0:
            raise ConfigError("model.num_mem_tokens", "memtr needs memory tokens: mem >= 1")
        if name == "rmt_xl" and m == 0:
            raise ConfigError("model.num_mem_tokens", "rmt_xl needs memory tokens: mem >= 1 (mem=0 is model=xl)")
        if self.read_mem_from_cache and not (c and m):
            raise ConfigError("model.read_mem_from_cache", "needs both memory tokens and a cache (model=rmt_xl)")
        if self.read_memory_emb and not (m and self.recurrent_memory):
            raise ConfigError("model.read_memory_emb", "needs recurrent memory tokens (model=rmt or rmt_xl)")
        if self.same_length and not c:
            raise ConfigError("model.same_length", "needs a cache: mem_len >= 1 (model=xl or rmt_xl)")

    def _check_hf(self) -> None:
        """What a wrapped Hugging Face model can be: no Transformer-XL cache, its own sizes and head."""
        if not self.hf_name.strip():
            raise ConfigError("model.hf_name", "backbone=hf needs a model: a Hub name (model.hf_name=gpt2) or a local "
                              "directory saved with save_pretrained")  # fmt: skip
        if self.mem_len:
            raise ConfigError("model.mem_len", f"a wrapped Hugging Face model has no Transformer-XL cache; use "
                              f"model=rmt, memtr or vanilla with backbone=hf (got model={self.name})")  # fmt: skip
        if self.adaptive_cutoffs:
            raise ConfigError("model.adaptive_cutoffs", "a wrapped Hugging Face model keeps its own output layer; "
                              "use []")  # fmt: skip

    @property
    def carries_state(self) -> bool:
        """Whether anything flows from one segment to the next (memory or cache)."""
        return self.mem_len > 0 or (self.num_mem_tokens > 0 and self.recurrent_memory)


@dataclass
@defaults_from(("task/_base.yaml", None))
class TaskConfig:
    """An algorithmic task of the paper (Sec. 4): copy, reverse, associative retrieval, quadratic equations."""

    name: str
    length: int  # symbols in X (copy, reverse)
    num_symbols: int  # alphabet of X; tokens 0 (pad) and 1 (start) come on top
    num_pairs: int  # key-value pairs (retrieval)
    segments: int
    # where padding goes when the segments do not divide the sequence (retrieval): `front`, hidden from attention;
    # `end`, after the answer in the last segment (the official code's uneven chunks, e.g. 10 tokens as 4 + 4 + 2)
    pad_side: str
    train_size: int
    valid_size: int = mark(resumable=True)
    test_size: int = mark(resumable=True)
    data_seed: int  # the data, valid and test sets included, depend on this seed only

    def __post_init__(self) -> None:
        _choice("task.name", self.name, ALGORITHMIC_TASKS)
        _at_least("task.length", self.length, 1)
        _at_least("task.num_symbols", self.num_symbols, 2)
        _in_range("task.num_pairs", self.num_pairs, 1, 26)
        _at_least("task.segments", self.segments, 1)
        _choice("task.pad_side", self.pad_side, PAD_SIDES)
        _at_least("task.train_size", self.train_size, 1)
        _at_least("task.valid_size", self.valid_size, 1)
        _at_least("task.test_size", self.test_size, 1)
        if self.name == "retrieval" and self.segments > self.unpadded_len:  # else padded at the front if need be
            raise ConfigError(
                "task.segments",
                f"retrieval has {self.unpadded_len} tokens: from 1 to {self.unpadded_len} segments (counts that do not "
                f"divide it are padded at the front), got {self.segments}",
            )
        total = self.seq_len
        if total % self.segments:
            divisors = [str(d) for d in range(1, total + 1) if total % d == 0]
            raise ConfigError(
                "task.segments",
                f"{self.segments} does not divide the {self.name} sequence of {total} tokens; "
                f"choose one of: {', '.join(divisors)}",
            )

    @property
    def unpadded_len(self) -> int:
        """Input length after the one-token shift: copy 3L, reverse 2L, retrieval 2*pairs + 2, quadratic 6 x 30."""
        lengths = {"copy": 3 * self.length, "reverse": 2 * self.length, "quadratic": 180}
        return lengths.get(self.name, 2 * self.num_pairs + 2)

    @property
    def padding(self) -> int:
        """Padding tokens that make `segments` divide a retrieval sequence (10 tokens in 3 or 4 segments: 2); 0 for
        the other tasks and for divisors."""
        return -self.unpadded_len % self.segments if self.name == "retrieval" else 0

    @property
    def pad_front(self) -> int:
        """Padding in front of the sequence, masked out of attention and the loss (`pad_side: front`)."""
        return self.padding if self.pad_side == "front" else 0

    @property
    def pad_end(self) -> int:
        """Padding after the answer, in the last segment (`pad_side: end`): no output before it depends on it."""
        return self.padding if self.pad_side == "end" else 0

    @property
    def seq_len(self) -> int:
        return self.unpadded_len + self.padding

    @property
    def segment_len(self) -> int:
        return self.seq_len // self.segments

    @property
    def metric(self) -> MetricSpec:
        """Greedy answer accuracy; for quadratic equations the exact match of the final answer (Table 1)."""
        if self.name == "quadratic":
            return MetricSpec("final_exact", ANSWER_METRICS | {"final_exact": True})
        return MetricSpec("acc", ANSWER_METRICS)

    @property
    def curriculum_keys(self) -> tuple[str, ...]:
        """The keys a curriculum may vary on this task (`trainer.curriculum.key`)."""
        return {"retrieval": ("num_pairs", "segments"), "copy": ("length", "segments"),
                "reverse": ("length", "segments")}.get(self.name, ())  # fmt: skip

    def at(self, named: dict[str, int]) -> TaskConfig:
        """This task at other values of curriculum keys, as a stage or an evaluation setting. One key: `num_pairs` /
        `length`, the segment count stays and the segment length follows; `segments`, the segment length stays and
        the sequence follows (copy 3L and reverse 2L tokens, retrieval as many pairs as fit, padded). Several keys:
        the sequence and the segment count named, the segment length follows. Raises ConfigError."""
        if list(named) != ["segments"]:
            return replace(self, **named)
        value = named["segments"]
        total = value * self.segment_len
        if self.name == "retrieval":
            if total < 4:
                raise ConfigError("trainer.curriculum.stages", f"{value} segments of {self.segment_len} tokens do not "
                                  "hold one retrieval pair (4 tokens: a key, its value, '?', the query)")  # fmt: skip
            return replace(self, segments=value, num_pairs=min((total - 2) // 2, 26))
        per = 3 if self.name == "copy" else 2
        if total % per:
            raise ConfigError("trainer.curriculum.stages", f"{value} segments of {self.segment_len} tokens do not hold "
                              f"a {self.name} sequence ({per} x length tokens)")  # fmt: skip
        return replace(self, segments=value, length=total // per)

    @property
    def key_value(self) -> dict:
        return {"num_pairs": self.num_pairs, "length": self.length, "segments": self.segments}


@dataclass
@defaults_from(("task/_facts_base.yaml", None))
class FactsTaskConfig:
    """The follow-up's memorisation tasks (arXiv 2304.11062; rmt_bench/tasks/facts.py): bAbI-style facts hidden in
    distractor text, a question at the end, one answer of 6 places. `memorize`: the fact opens the sequence;
    `detect`: it stands anywhere before the question; `reason`: two people's places and one object picked up,
    anywhere, and the question asks where the object is (it needs the pick-up and its holder's place)."""

    name: str
    variant: str
    segments: int
    segment_len: int  # tokens per segment; the question closes the last one
    filler_dir: str | None  # distractor text (WikiText layout or .txt files); None: the built-in filler
    filler_vocab: int  # the most frequent filler words kept (the rest is <unk>)
    train_size: int  # examples per epoch; training examples are drawn afresh from (seed, step)
    valid_size: int = mark(resumable=True)
    test_size: int = mark(resumable=True)
    data_seed: int
    cache_dir: str | None = mark(hashed=False, resumable=True)  # the encoded filler corpus

    def __post_init__(self) -> None:
        _choice("task.name", self.name, FACTS_TASKS)
        _choice("task.variant", self.variant, FACT_VARIANTS)
        for key in ("segments", "segment_len", "filler_vocab", "train_size", "valid_size", "test_size"):
            _at_least(f"task.{key}", getattr(self, key), 1)
        if self.seq_len < self.facts_need:
            raise ConfigError("task.segment_len", f"{self.segments} x {self.segment_len} tokens do not hold the "
                              f"{self.variant} task's facts and question ({self.facts_need} tokens)")  # fmt: skip

    @property
    def facts_need(self) -> int:
        """Tokens the facts and the question take: memorize / detect 6 + 4, reason 3 x 6 + 5."""
        return 23 if self.variant == "reason" else 10

    @property
    def seq_len(self) -> int:
        return self.segments * self.segment_len

    unpadded_len = seq_len
    pad_front = pad_end = padding = 0

    @property
    def metric(self) -> MetricSpec:
        return MetricSpec("acc", ANSWER_METRICS)

    curriculum_keys = ("segments",)

    def at(self, named: dict[str, int]) -> FactsTaskConfig:
        """The task in `named["segments"]` segments of the same length (a curriculum stage, an evaluation length)."""
        if list(named) != ["segments"]:
            raise ConfigError("trainer.curriculum.key", "the facts tasks vary: segments")
        return replace(self, segments=named["segments"])

    @property
    def key_value(self) -> dict:
        return {"segments": self.segments}


@dataclass
@defaults_from(("task/_classify_base.yaml", None))
class ClassifyTaskConfig:
    """Table 3: long-document classification (Hyperpartisan news, by article; rmt_bench/tasks/hyperpartisan.py).
    An article in the wrapped model's tokens, cut or padded to `segments` x `segment_len`, its class the one answer
    at the end; scored by F1 of the positive class (hyperpartisan) and accuracy."""

    name: str
    data_dir: str | None = mark(hashed=False, resumable=True)  # {train,valid,test}.jsonl: {"text", "label"}
    tokenizer: str | None  # a Hub name or directory; None: the wrapped model's (model.hf_name)
    segments: int
    segment_len: int  # tokens of the article per segment (512 - 10 memory - 3 special = 499 for BERT)

    def __post_init__(self) -> None:
        _choice("task.name", self.name, CLASSIFY_TASKS)
        _at_least("task.segments", self.segments, 1)
        _at_least("task.segment_len", self.segment_len, 2)

    @property
    def seq_len(self) -> int:
        return self.segments * self.segment_len

    unpadded_len = seq_len
    pad_front = pad_end = padding = 0
    curriculum_keys = ()

    @property
    def metric(self) -> MetricSpec:
        """F1 of the positive class (the paper's Table 3), beside the answer accuracy."""
        return MetricSpec("f1", ANSWER_METRICS | {"f1": True})


@dataclass
@defaults_from(("trainer/_base.yaml", "trainer.curriculum"))
class CurriculumConfig:
    """Stages of the task before its own setting (PAPER.md: the follow-up and BABILong / ARMT train memory this
    way): the stage's value of `key` (`num_pairs`, `length` or `segments`) rises through `stages`, then the task's
    own value is the last stage. Each stage continues from the last; the next one starts when the stage's own
    validation reaches `threshold` (greedy accuracy) or after `max_stage_steps`. `varying`: each batch draws
    its value uniformly from the first stage's to the current stage's.

    Several keys (`key: [num_pairs, segments]`, `stages: [[1, 2], [2, 2], [3, 2], [4, 2]]`): each stage names one
    value per key, e.g. the pairs at 2 segments and then the segments at the task's pairs; the sequence is the one
    named and the segment length follows from the segment count."""

    key: str | list[str] | None
    stages: list  # values of `key`; with several keys, one list of values per stage
    threshold: float
    max_stage_steps: int | None
    varying: bool
    valid_size: int  # examples in each stage's validation set

    def __post_init__(self) -> None:
        if isinstance(self.key, (list, tuple)):
            self.key = [str(k) for k in self.key] if len(self.key) > 1 else (str(self.key[0]) if self.key else None)
        for key in self.keys:
            _choice("trainer.curriculum.key", key, CURRICULUM_KEYS)
        if len(set(self.keys)) < len(self.keys):
            raise ConfigError("trainer.curriculum.key", f"names a key twice: {self.key}")
        if not self.keys and self.stages:
            raise ConfigError("trainer.curriculum.key", f"stages {self.stages} need a key: one of "
                              f"{', '.join(CURRICULUM_KEYS)}")  # fmt: skip
        if self.keys and not self.stages:
            raise ConfigError("trainer.curriculum.stages", "an empty list; give the values before the task's own, e.g. "
                              "[1,2,3] (or key=null: no curriculum)")  # fmt: skip
        self.stages = [self._stage(v) for v in self.stages]
        values = self.stage_values
        if any(v < 1 for stage in values for v in stage):
            raise ConfigError("trainer.curriculum.stages", f"must be values >= 1, got {self.stages}")
        if any(b == a or any(y < x for x, y in zip(a, b)) for a, b in zip(values, values[1:])):
            rise = "increasing" if len(self.keys) == 1 else "rising stage by stage (no key falling, none repeated)"
            raise ConfigError("trainer.curriculum.stages", f"must be {rise}, got {self.stages}")
        _in_range("trainer.curriculum.threshold", self.threshold, 0.0, 1.0)
        if self.max_stage_steps is not None:
            _at_least("trainer.curriculum.max_stage_steps", self.max_stage_steps, 1)
        _at_least("trainer.curriculum.valid_size", self.valid_size, 1)

    def _stage(self, value):
        """One stage as given: an int for one key, a list of one int per key for several."""
        several = len(self.keys) > 1
        if several != isinstance(value, (list, tuple)) or (several and len(value) != len(self.keys)):
            shape = f"a list of {len(self.keys)} values ({', '.join(self.keys)})" if several else "an integer"
            raise ConfigError("trainer.curriculum.stages", f"each stage is {shape}, got {value!r}")
        try:
            return [int(v) for v in value] if several else int(value)
        except (TypeError, ValueError):
            raise ConfigError("trainer.curriculum.stages", f"values must be integers, got {value!r}") from None

    @property
    def on(self) -> bool:
        return self.key is not None

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys a stage sets: none, one, or several."""
        return () if self.key is None else (self.key,) if isinstance(self.key, str) else tuple(self.key)

    @property
    def stage_values(self) -> list[tuple[int, ...]]:
        """Each stage's values, one per key."""
        return [tuple(v) if isinstance(v, list) else (v,) for v in self.stages]

    def settings(self, task: TaskConfig | LMTaskConfig) -> list[TaskConfig]:
        """Every stage's task config, the task's own last. Raises ConfigError for a schedule the task cannot run."""
        if not self.on:
            return [task]
        if not getattr(task, "curriculum_keys", ()):
            raise ConfigError(
                "trainer.curriculum.key",
                f"task {task.name} has no curriculum (it varies copy, reverse, retrieval and facts); "
                "use trainer.curriculum.key=null",
            )
        for key in self.keys:
            if key not in task.curriculum_keys:
                raise ConfigError("trainer.curriculum.key", f"'{key}' is not a key task {task.name} can vary; "
                                  f"choose one of: {', '.join(task.curriculum_keys)}")  # fmt: skip
        final = tuple(task.key_value[key] for key in self.keys)
        for stage in self.stage_values:
            past = [f"{k} {v} > {f}" for k, v, f in zip(self.keys, stage, final) if v > f]
            if past:
                raise ConfigError("trainer.curriculum.stages", f"stage {list(stage) if len(stage) > 1 else stage[0]} "
                                  f"is past the task's own setting ({', '.join(past)}); stages must stay at or below "
                                  "it")  # fmt: skip
        out = []
        for stage in (s for s in self.stage_values if s != final):
            named = dict(zip(self.keys, stage))
            try:
                out.append(task.at(named))
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v}" for k, v in named.items())
                raise ConfigError("trainer.curriculum.stages", f"stage {shown}: {exc}") from None
        return [*out, task]


@dataclass
@defaults_from(("task/_lm_base.yaml", None))
class LMTaskConfig:
    """Language modelling (PAPER.md, Table 2): WikiText-103 words (ppl) or enwik8-layout characters (bpc)."""

    name: str
    level: str  # word: perplexity; char: bits per character
    # wiki.{train,valid,test}.tokens or {train,valid,test}.txt; None: `datasets`
    data_dir: str | None = mark(hashed=False, resumable=True)
    # the encoded corpus; None: $RMT_BENCH_CACHE or ~/.cache/rmt-bench
    cache_dir: str | None = mark(hashed=False, resumable=True)
    segment_len: int
    segments: int  # consecutive segments per training step and column
    eval_segment_len: int | None = mark(resumable=True)  # None: segment_len
    eval_mem_len: int | None = mark(resumable=True)  # Transformer-XL evaluates with a longer cache; None: mem_len
    max_train_tokens: int | None  # cut the streams (CPU-sized runs); None: all
    max_eval_tokens: int | None = mark(resumable=True)

    @property
    def metric(self) -> MetricSpec:
        """Perplexity over the whole test stream (words), or bits per character (characters)."""
        headline = "ppl" if self.level == "word" else "bpc"
        return MetricSpec(headline, {"loss": False, headline: False})

    def __post_init__(self) -> None:
        _choice("task.name", self.name, LM_TASKS)
        _choice("task.level", self.level, LEVELS)
        _at_least("task.segment_len", self.segment_len, 1)
        _at_least("task.segments", self.segments, 1)
        for key in ("eval_segment_len", "max_train_tokens", "max_eval_tokens"):
            if getattr(self, key) is not None:
                _at_least(f"task.{key}", getattr(self, key), 2 if key.startswith("max") else 1)
        if self.eval_mem_len is not None:
            _at_least("task.eval_mem_len", self.eval_mem_len, 0)


@dataclass
@defaults_from(("trainer/_base.yaml", "trainer"))
class TrainerConfig:
    """The optimisation, the budget and the evaluation; the defaults are the paper's schedule for the algorithmic
    tasks (trainer/_base.yaml), the presets of configs/trainer/ are deltas of it."""

    device: str = mark(hashed=False, resumable=True)
    precision: str  # auto: bf16 autocast where it is measured faster (train/precision.py), else fp32
    optimizer: str
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    schedule: str
    warmup_steps: int
    min_lr: float
    plateau_factor: float
    plateau_patience: int  # evaluations without improvement of the validation loss
    grad_clip: float
    batch_size: int
    max_steps: int = mark(resumable=True)
    # a time budget: the steps that fit in it are measured once, before step 0, and become the run's step
    # budget (at most max_steps); the run is then a function of its step count, not of the clock
    max_minutes: float | None = mark(resumable=True)
    early_stop_acc: float | None = mark(resumable=True)  # stop once validation greedy accuracy reaches this
    # also test with the memory reset at every segment (test_memory_reset/*)
    memory_reset_control: bool = mark(resumable=True)
    eval_every: int = mark(resumable=True)
    eval_batch_size: int = mark(resumable=True)
    log_every: int = mark(resumable=True)
    num_threads: int | None = mark(hashed=False, resumable=True)  # torch CPU threads; None: torch's default
    # a finished run's directory: start from its tested weights (job.py; the same task and model shapes), the
    # optimiser and schedule afresh: a curriculum across runs (e.g. a task without filler, then with it). Not in
    # the cell's hash: each seed of a suite cell starts from its own seed's run (suite.py, `after`)
    init_from: str | None = mark(hashed=False)
    curriculum: CurriculumConfig

    def __post_init__(self) -> None:
        if isinstance(self.curriculum, dict):
            self.curriculum = from_dict(CurriculumConfig, self.curriculum, "trainer.curriculum")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError("trainer.betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        _choice("trainer.device", self.device, DEVICES)
        _choice("trainer.precision", self.precision, PRECISIONS)
        _choice("trainer.optimizer", self.optimizer, OPTIMIZERS)
        _choice("trainer.schedule", self.schedule, SCHEDULES)
        if not self.lr or self.lr <= 0:
            raise ConfigError("trainer.lr", f"must be > 0, got {self.lr}")
        _at_least("trainer.weight_decay", self.weight_decay, 0.0)
        _at_least("trainer.warmup_steps", self.warmup_steps, 0)
        _at_least("trainer.min_lr", self.min_lr, 0.0)
        _in_range("trainer.plateau_factor", self.plateau_factor, 0.0, 1.0)
        _at_least("trainer.plateau_patience", self.plateau_patience, 0)
        _at_least("trainer.grad_clip", self.grad_clip, 0.0)
        for key in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "log_every"):
            _at_least(f"trainer.{key}", getattr(self, key), 1)
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("trainer.max_minutes", f"must be > 0 or null, got {self.max_minutes}")
        if self.early_stop_acc is not None:
            _in_range("trainer.early_stop_acc", self.early_stop_acc, 0.0, 1.0)
        if self.num_threads is not None:
            _at_least("trainer.num_threads", self.num_threads, 1)


@dataclass
@defaults_from(("logger/_base.yaml", None))
class LoggerConfig:
    """W&B (offline by default) beside the run directory's own files; nothing here changes what a run computes."""

    kind: str = mark(hashed=False, resumable=True)
    project: str = mark(hashed=False, resumable=True)
    mode: str = mark(hashed=False, resumable=True)  # WANDB_MODE in the environment wins, as wandb itself does
    entity: str | None = mark(hashed=False, resumable=True)
    tags: list[str] = mark(hashed=False, resumable=True)  # added to the run's own: task, model, backbone style
    log_checkpoint: bool = mark(hashed=False, resumable=True)  # the final checkpoint.pt as a W&B artifact
    # the W&B group and run name; null: the CLI's (the sweep, the job's overrides)
    group: str | None = mark(hashed=False, resumable=True)
    name: str | None = mark(hashed=False, resumable=True)

    def __post_init__(self) -> None:
        _choice("logger.kind", self.kind, LOGGERS)
        _choice("logger.mode", self.mode, WANDB_MODES)
        self.tags = list(self.tags)


@dataclass
@defaults_from(("config.yaml", None), only=("seed", "mem", "resume", "scale"))
class RunConfig:
    model: ModelConfig
    task: TaskConfig | LMTaskConfig | FactsTaskConfig | ClassifyTaskConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    seed: int = mark(hashed=False)
    mem: int
    # continue from checkpoint.pt in the run dir (set hydra.run.dir to the old run)
    resume: bool = mark(hashed=False, resumable=True)
    # the benchmark scale of a suite cell (cpu | paper): a label kept in summary.json
    scale: str | None = mark(hashed=False, resumable=True)

    def __post_init__(self) -> None:
        check_mem(self.mem)
        # a memory model without memory silently trains another model: say so (the library allows rmt with
        # 0 memory tokens, which the equivalence tests use; the command line does not)
        if self.model.name == "xl" and self.model.mem_len == 0:
            raise ConfigError("mem", "model=xl needs a cache: mem >= 1 (with mem=0 it is model=vanilla)")
        if self.model.name == "rmt" and self.model.num_mem_tokens == 0:
            raise ConfigError("mem", "model=rmt needs memory tokens: mem >= 1 (with mem=0 it is model=vanilla)")
        self.trainer.curriculum.settings(self.task)  # a schedule the task cannot run is one line here
        if self.model.hf_name is not None and self.model.hf_kind == "encoder":
            # an encoder sees the whole segment: it can only answer one token at the sequence's end (models/hf.py)
            one_answer = self.task.name in ("retrieval", "facts", *CLASSIFY_TASKS) and not self.task.pad_end
            if not one_answer:
                tasks = "retrieval (pad_side front), facts or hyperpartisan"
                raise ConfigError("model.hf_kind", f"an encoder sees the whole segment, so it answers one token at the "
                                  f"end: task {tasks}, not {self.task.name}; use model.hf_kind=decoder")  # fmt: skip
        if self.task.name in CLASSIFY_TASKS and self.task.tokenizer is None:
            if self.model.hf_name is None:
                how = "use backbone=hf (the wrapped model's) or give task.tokenizer=NAME_OR_DIR"
                raise ConfigError("task.tokenizer", f"task {self.task.name} reads text with a Hugging Face tokenizer: "
                                  f"{how}")  # fmt: skip
            self.task.tokenizer = self.model.hf_name


def marked_keys(mark_name: str, value: bool, cls=None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the run config whose mark `mark_name` (hashed / resumable) is `value`, over every config
    class a section may hold (the task: TaskConfig or LMTaskConfig)."""
    cls = cls or RunConfig
    hints, out = typing.get_type_hints(cls), []
    for f in fields(cls):
        kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if is_dataclass(k)]
        if kinds:
            out += [key for kind in kinds for key in marked_keys(mark_name, value, kind, f"{prefix}{f.name}.")]
        elif f.metadata.get(mark_name, mark_name == "hashed") == value:
            out.append(prefix + f.name)
    return tuple(dict.fromkeys(out))


def config_hash(cfg: RunConfig) -> str:
    """12 hex digits naming the cell's configuration: equal for the seeds of one cell, different when any key
    that shapes the run (model, backbone, task, schedule, budget, evaluation) differs. summary.json keeps it and
    rmt-bench-report pools only runs that share it. Keys marked `hashed=False` are left out."""
    data = asdict(cfg)
    for key in marked_keys("hashed", False):
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config_from_dict(data: dict) -> RunConfig:
    """A plain dict (a composed config, or a run's config.json) -> validated dataclasses; extra top-level keys
    (Hydra's `hydra`, config.json's `choices`) are left out."""
    data = {k: v for k, v in data.items() if k not in ("hydra", "choices")}
    check_mem(data.get("mem"))
    task_cls = task_config_class(data.get("task", {}).get("name"))
    parts = {"model": ModelConfig, "task": task_cls, "trainer": TrainerConfig, "logger": LoggerConfig}
    built = {key: from_dict(cls, data.pop(key), key) for key, cls in parts.items()}
    return from_dict(RunConfig, data | built, "config")


def task_config_class(name: str):
    """The config class of task `name` (algorithmic, language modelling, or the follow-up's facts)."""
    if name in CLASSIFY_TASKS:
        return ClassifyTaskConfig
    return LMTaskConfig if name in LM_TASKS else FactsTaskConfig if name in FACTS_TASKS else TaskConfig


def width_std(d_model) -> float:
    """The `trainable` style's init std, sqrt(2 / (5 d_model)) (SmallInit, Nguyen & Salazar 2019)."""
    return round((2 / (5 * float(d_model))) ** 0.5, 6) if float(d_model) >= 1 else 0.02


def check_mem(mem) -> None:
    """`mem` feeds several model keys through interpolation: check it first, under its own name."""
    _check_type("mem", "int", mem)
    if mem < 0:
        raise ConfigError("mem", f"must be >= 0 (memory tokens for rmt models, cache length for xl), got {mem}")


def from_dict(cls, data: dict, prefix: str):
    """Build dataclass `cls` from a plain dict, naming unknown keys the way the user typed them."""
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", f"unknown key; known keys: {', '.join(sorted(known))}")
        _check_type(f"{prefix}.{key}" if prefix != "config" else key, known[key].type, value)
    return cls(**data)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(key: str, annotation: str, value) -> None:
    """Reject e.g. `mem=abc` or `trainer.lr=fast` with the type the key takes."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" not in kinds:
            raise ConfigError(key, f"must be set (a {kinds[0]})")
        return
    for kind in kinds:
        allowed = _TYPES.get(kind)
        if allowed is None:
            return  # lists, tuples, nested configs: checked by their own validation
        if isinstance(value, allowed) and not (kind in ("int", "float") and isinstance(value, bool)):
            if kind == "float" and not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {value}")
            return
    raise ConfigError(key, f"must be {' or '.join(k for k in kinds if k != 'None')}, got {value!r}")
