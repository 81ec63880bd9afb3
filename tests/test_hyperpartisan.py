"""Table 3's task (task=hyperpartisan, rmt_bench/tasks/hyperpartisan.py) on data the tests write in the official
format, with a tiny BERT and a word-level tokenizer built locally (`make_tiny`): the preparation from the official
XML and Longformer's split file, the example layout, F1 against a direct count, a command-line run, bad data."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys

import pytest
import torch

from rmt_bench.config import ClassifyTaskConfig, ConfigError, ModelConfig, model_switches
from rmt_bench.models import build_model
from rmt_bench.models.hf import make_tiny
from rmt_bench.tasks import build_task
from tests.helpers import ROOT, TINY, run_cli

WORDS = [
    "the", "a", "of", "news", "report", "said", "government", "people", "market", "vote", "policy", "city", "game",
    "team", "school", "water",
]  # fmt: skip


def write_articles(folder, sizes=(("train", 60), ("valid", 20), ("test", 20)), seed=0):
    """{train,valid,test}.jsonl: 60-word articles, hyperpartisan (1) when the word 'outrageous' is in them."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        rows = []
        for i in range(n):
            label = rng.random() < 0.4
            words = [rng.choice(WORDS) for _ in range(60)]
            if label:
                words[rng.randrange(20)] = "outrageous"
            rows.append(json.dumps({"id": i, "text": " ".join(words), "label": int(label)}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hp")
    articles = write_articles(root / "data")
    texts = [json.loads(x)["text"] for x in (articles / "train.jsonl").read_text().splitlines()]
    model = make_tiny("bert", root / "bert", [*texts, "outrageous"], vocab_size=100)
    return {"dir": articles, "model": str(model)}


def task_cfg(data, **kw) -> ClassifyTaskConfig:
    return ClassifyTaskConfig(**({"data_dir": str(data["dir"]), "tokenizer": data["model"], "segments": 2,
                                  "segment_len": 16} | kw))  # fmt: skip


def test_an_example_is_the_articles_tokens_cut_or_padded_then_a_closing_token_and_the_class(data):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(data["model"])
    task = build_task(task_cfg(data))
    batch = task.splits["test"]
    rows = [json.loads(x) for x in (data["dir"] / "test.jsonl").read_text().splitlines()]
    assert batch.inputs.shape == (20, 2, 16) and task.vocab_size == len(tok) + 2
    for b, row in enumerate(rows):
        flat, targets = batch.inputs[b].flatten().tolist(), batch.targets[b].flatten()
        words = tok(row["text"], add_special_tokens=False)["input_ids"]
        assert flat[:31] == words[:31]  # 60 words cut to 2 x 16 - 1
        assert flat[31] == tok.sep_token_id and targets[31] == len(tok) + row["label"]
        assert batch.loss_mask[b].flatten().nonzero().flatten().tolist() == [31]
    short = build_task(task_cfg(data, segments=5))  # 80 positions: the 60 words, then padding
    first = short.splits["test"].inputs[0].flatten().tolist()
    assert first[60:79] == [tok.pad_token_id] * 19 and first[79] == tok.sep_token_id


def test_f1_and_accuracy_are_those_of_a_direct_count(data):
    task = build_task(task_cfg(data))
    torch.manual_seed(0)
    cfg = ModelConfig(**model_switches("rmt", 2), hf_name=data["model"], hf_kind="encoder")
    model = build_model(cfg, task.vocab_size).eval()
    batch = task.splits["test"]
    with torch.no_grad():  # a head that calls an article hyperpartisan when its [CLS] output lies past the mean
        cls = model(batch.inputs)[0][:, -1, -1]  # along a hyperpartisan article's: both classes get predicted
        first = int((batch.targets[:, -1, -1] == task.vocab_size - 1).nonzero()[0])
        v = cls[first] - cls.mean(0)
        model.head.proj.weight.zero_()
        model.head.proj.bias.fill_(-10.0)
        model.head.proj.weight[-1] = v
        model.head.proj.bias[-2:] = torch.stack([torch.tensor(0.0), -(v @ cls.mean(0))])
    got = task.evaluate(model, "test", 7, contextlib.nullcontext)
    with torch.no_grad():
        hidden, _ = model(batch.inputs)
    pred = model.head.logits(hidden[:, -1, -1]).argmax(-1).tolist()
    truth = batch.targets[:, -1, -1].tolist()
    pos = task.vocab_size - 1
    tp = sum(p == t == pos for p, t in zip(pred, truth))
    fp = sum(p == pos != t for p, t in zip(pred, truth))
    fn = sum(t == pos != p for p, t in zip(pred, truth))
    assert 0 < pred.count(pos) < len(pred) and tp > 0 and fp != fn, (tp, fp, fn)  # F1 is neither 0, acc nor precision
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["acc"] == pytest.approx(sum(p == t for p, t in zip(pred, truth)) / len(truth))


def test_the_command_line_trains_and_tests_table3s_task_with_a_local_model(data, tmp_path):
    tiny = [a for a in TINY if not a.startswith(("task.", "backbone="))]  # backbone: the task's (an hf encoder)
    args = [*tiny, "task=hyperpartisan", f"task.data_dir={data['dir']}", f"model.hf_name={data['model']}", "model=rmt",
            "mem=2", "task.segments=2", "task.segment_len=16", "trainer.memory_reset_control=true",
            f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["higher_is_better"] is True
    assert 0.0 <= summary["test/f1"] <= 1.0 and "test_memory_reset/f1" in summary
    f1, acc = summary["test/f1"], summary["test/acc"]
    line = f"hyperpartisan rmt mem=2 segments=2 seed=0 | test f1 {f1:.4f} acc {acc:.4f} |"
    assert line in res.stdout


def test_prepare_data_reads_the_official_files_and_longformers_split(tmp_path):
    articles = "".join(f'<article id="{i:07d}" title="t{i}"><p>Text  of\n article {i}.</p></article>' for i in range(6))
    truth = "".join(f'<article id="{i:07d}" hyperpartisan="{str(i % 2 == 0).lower()}"/>' for i in range(6))
    (tmp_path / "a.xml").write_text(f"<articles>{articles}</articles>")
    (tmp_path / "g.xml").write_text(f"<articles>{truth}</articles>")
    (tmp_path / "s.json").write_text(json.dumps({"train": [0, 3, 4], "dev": [1], "test": [5, 2]}))
    script = str(ROOT / "scripts" / "prepare_data.py")
    cmd = [sys.executable, script, "hyperpartisan", "a.xml", "g.xml", "s.json", "out"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    test = [json.loads(x) for x in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert test == [
        {"id": 5, "text": "Text of article 5.", "label": 0},
        {"id": 2, "text": "Text of article 2.", "label": 1},
    ]
    assert [json.loads(x)["id"] for x in (tmp_path / "out" / "valid.jsonl").read_text().splitlines()] == [1]
    assert len((tmp_path / "out" / "train.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "task.data_dir: {dir} has no valid.jsonl"),
        ("malformed", 'task.data_dir: {dir}/test.jsonl:2: expected {{"text": ..., "label": 0 or 1}}'),
        ("label", "task.data_dir: {dir}/test.jsonl:1: label 3; expected 0 or 1"),
    ],
)
def test_bad_data_is_one_clear_error(data, tmp_path, setup, message):
    folder = write_articles(tmp_path / "d")
    if setup == "missing":
        (folder / "valid.jsonl").unlink()
    elif setup == "malformed":
        (folder / "test.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    else:
        (folder / "test.jsonl").write_text('{"text": "a", "label": 3}\n')
    with pytest.raises(ConfigError, match=message.format(dir=folder).replace("{", r"\{").replace("(", r"\(")):
        build_task(task_cfg(data, data_dir=str(folder)))


def test_the_task_needs_a_tokenizer(tmp_path):
    tiny = [a for a in TINY if not a.startswith("task.")]  # backbone=tiny: not a wrapped model
    res = run_cli(*tiny, "task=hyperpartisan", f"task.data_dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: task.tokenizer: task hyperpartisan reads text with a Hugging Face tokenizer: "
        "use backbone=hf (the wrapped model's) or give task.tokenizer=NAME_OR_DIR"
    )
