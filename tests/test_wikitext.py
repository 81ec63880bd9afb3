"""WikiText-103 language modelling on a small WikiText-format corpus the tests write."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from rmt_bench.config import ConfigError, LMTaskConfig
from rmt_bench.models import build_model
from rmt_bench.models.heads import AdaptiveSoftmaxHead, build_embedding_and_head
from rmt_bench.tasks import build_task
from rmt_bench.tasks.wikitext import EOS, load_corpus
from rmt_bench.train.loop import evaluate
from tests.helpers import run_cli, tiny_model, write_wikitext


def lm_cfg(tmp_path: Path, **kw) -> LMTaskConfig:
    data = kw.pop("data_dir", None) or write_wikitext(tmp_path / "wt")
    return LMTaskConfig(
        data_dir=str(data), cache_dir=str(tmp_path / "cache"), segment_len=kw.pop("segment_len", 8), **kw
    )


def test_vocab_and_eos_counts(tmp_path):
    data = write_wikitext(tmp_path / "wt")
    vocab, splits = load_corpus(lm_cfg(tmp_path, data_dir=data))
    train_lines = (data / "wiki.train.tokens").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab.index(EOS) >= 0
    assert int((splits["train"] == vocab.index(EOS)).sum()) == len(train_lines)  # empty lines too
    words = {w for line in train_lines for w in line.split()}
    assert set(vocab) == words | {EOS}
    assert len(splits["train"]) == sum(len(line.split()) + 1 for line in train_lines)
    counts = np.bincount(np.asarray(splits["train"]), minlength=len(vocab))
    assert (np.diff(counts) <= 0).all()  # most frequent first: the adaptive softmax cutoffs rely on it
    assert "Heading" in vocab and "@-@" in vocab and "<unk>" in vocab


def test_vocabulary_is_train_only(tmp_path):
    data = write_wikitext(tmp_path / "wt")
    with open(data / "wiki.valid.tokens", "a", encoding="utf-8") as f:
        f.write(" zebra quagga \n")
    vocab, splits = load_corpus(lm_cfg(tmp_path, data_dir=data))
    assert "zebra" not in vocab
    assert int((np.asarray(splits["valid"][-3:-1]) == vocab.index("<unk>")).sum()) == 2


def test_cache_reloads_identically_and_rebuilds_on_change(tmp_path):
    cfg = lm_cfg(tmp_path)
    vocab, first = load_corpus(cfg)
    folders = list((tmp_path / "cache").iterdir())
    stamp = (folders[0] / "train.npy").stat().st_mtime_ns
    vocab2, again = load_corpus(cfg)
    assert vocab == vocab2 and all(np.array_equal(first[s], again[s]) for s in first)
    assert (folders[0] / "train.npy").stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    assert isinstance(again["train"], np.memmap)
    with open(Path(cfg.data_dir) / "wiki.train.tokens", "a", encoding="utf-8") as f:
        f.write(" brand new words \n")
    vocab3, _ = load_corpus(cfg)
    assert "brand" in vocab3 and len(list((tmp_path / "cache").iterdir())) == 2


def test_transformer_xl_layout_is_read_too(tmp_path):
    data = write_wikitext(tmp_path / "txl", names="{}.txt")
    vocab, splits = load_corpus(lm_cfg(tmp_path, data_dir=data))
    assert len(splits["test"]) > 0 and EOS in vocab


def test_batches_follow_the_stream_per_column(tmp_path):
    task = build_task(lm_cfg(tmp_path, segment_len=5, segments=2))
    stream = torch.from_numpy(np.asarray(task.data["train"], dtype=np.int64))
    bsz, per_col = 3, len(stream) // 3
    batches = task.train_batches(bsz, seed=0)
    seen = torch.cat([next(batches).inputs.reshape(bsz, -1) for _ in range(4)], dim=1)  # 4 x 2 x 5 tokens
    for c in range(bsz):
        assert torch.equal(seen[c], stream[c * per_col : c * per_col + 40])
    b = next(task.train_batches(bsz, seed=0))
    assert torch.equal(b.targets.reshape(bsz, -1)[:, :-1], b.inputs.reshape(bsz, -1)[:, 1:])


@pytest.mark.parametrize("name", ["xl", "rmt", "rmt_xl"])
def test_one_pass_equals_chunks_with_state_carried(tmp_path, name):
    task = build_task(lm_cfg(tmp_path))
    model = build_model(tiny_model(name), task.vocab_size).eval()
    x = task.columns("valid", 2)[:, : 4 * 8].reshape(2, 4, 8)
    whole, _ = model(x)
    state, parts = None, []
    for s in range(4):
        h, state = model(x[:, s : s + 1], state)
        parts.append(h)
    assert_close(whole, torch.cat(parts, 1))


def stream_nll(model, task, split: str, bsz: int, n: int) -> float:
    """The reference for stream evaluation: the split's columns as one pass of the segment loop over all its
    full segments, then the shorter last one from the state it leaves; mean nll per token."""
    cols = task.columns(split, bsz)
    x, y = cols[:, :-1], cols[:, 1:]
    full = x.shape[1] // n * n
    with torch.no_grad():
        hidden, state = model(x[:, :full].reshape(bsz, -1, n))
        nll = model.head.nll(hidden.flatten(0, 2), y[:, :full].flatten()).sum()
        if full < x.shape[1]:
            rest, _ = model(x[:, None, full:], state)
            nll += model.head.nll(rest.flatten(0, 2), y[:, full:].flatten()).sum()
    return nll.item() / y.numel()


@pytest.mark.parametrize("name", ["xl", "rmt", "rmt_xl"])
def test_stream_evaluation_carries_state_as_one_long_pass(tmp_path, name):
    task = build_task(lm_cfg(tmp_path, eval_segment_len=7))
    model = build_model(tiny_model(name, init_std=0.5), task.vocab_size)  # outputs that depend on the context
    out = evaluate(model, task, "valid", 3, contextlib.nullcontext)
    assert out["loss"] == pytest.approx(stream_nll(model.eval(), task, "valid", 3, 7), rel=1e-5)


def test_evaluation_cache_length_is_passed_in_not_written_into_the_model(tmp_path):
    """task.eval_mem_len=12 on a model trained with mem_len=4 == the same weights built with mem_len=12; the
    model's own config keeps 4. (init 0.5: outputs that depend on the context beyond the tolerance)"""
    task = build_task(lm_cfg(tmp_path, eval_mem_len=12))
    model = build_model(tiny_model("xl", mem_len=4, init_std=0.5), task.vocab_size)
    longer = build_model(tiny_model("xl", mem_len=12, init_std=0.5), task.vocab_size).eval()
    longer.load_state_dict(model.state_dict())
    out = evaluate(model, task, "valid", 3, contextlib.nullcontext)
    assert model.cfg.mem_len == 4
    assert out["loss"] == pytest.approx(stream_nll(longer, task, "valid", 3, 8), rel=1e-5)
    assert out["loss"] != pytest.approx(stream_nll(model.eval(), task, "valid", 3, 8), rel=1e-3)


def test_uniform_model_has_perplexity_of_the_vocabulary(tmp_path):
    task = build_task(lm_cfg(tmp_path))
    model = build_model(tiny_model("xl"), task.vocab_size)
    torch.nn.init.zeros_(model.head.proj.weight)
    torch.nn.init.zeros_(model.head.proj.bias)
    out = evaluate(model, task, "test", 4, contextlib.nullcontext)
    assert math.isclose(out["ppl"], task.vocab_size, rel_tol=1e-4)


def test_char_level_reports_bits_per_character(tmp_path):
    data = tmp_path / "enwik8"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("valid", 400), ("test", 400)):
        text = "".join(rng.choice(list("abcde \n"), size=n))
        (data / f"{split}.txt").write_text(" ".join("\n" if ch == "\n" else str(ord(ch)) for ch in text))
    task = build_task(
        LMTaskConfig(name="enwik8", level="char", data_dir=str(data), cache_dir=str(tmp_path / "c"), segment_len=16)
    )
    model = build_model(tiny_model("vanilla"), task.vocab_size)
    torch.nn.init.zeros_(model.head.proj.weight)
    torch.nn.init.zeros_(model.head.proj.bias)
    out = evaluate(model, task, "valid", 2, contextlib.nullcontext)
    assert math.isclose(out["bpc"], math.log2(task.vocab_size), rel_tol=1e-4)


def test_adaptive_softmax_is_a_distribution_and_ties_weights():
    torch.manual_seed(0)
    embed, head = build_embedding_and_head(16, 50, [10, 30], div_val=2, tie=True)
    assert isinstance(head, AdaptiveSoftmaxHead)
    h = torch.randn(7, 16)
    logp = head.log_prob(h)
    assert_close(logp.logsumexp(-1), torch.zeros(7), atol=1e-5, rtol=0)
    targets = torch.tensor([0, 9, 10, 29, 30, 49, 5])
    assert_close(head.nll(h, targets), -logp.gather(1, targets[:, None]).squeeze(1))
    own = {id(p) for p in head.parameters()}
    assert all(id(t.weight) in own for t in embed.tables)  # tied: the head uses the embedding's tables
    assert embed(torch.tensor([[3, 40]])).shape == (1, 2, 16)


def test_paper_base_model_has_about_151m_parameters():
    from rmt_bench.cli import to_run_config
    from tests.helpers import compose_cfg

    cfg = to_run_config(compose_cfg(["task=wikitext103", "model=xl", "mem=150"]))
    model = build_model(cfg.model, 267_735)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 151e6) / 151e6 < 0.02, n


def test_adaptive_cutoffs_beyond_the_vocabulary_fail_at_config_time(tmp_path):
    task = build_task(lm_cfg(tmp_path))
    with pytest.raises(ConfigError, match="adaptive_cutoffs"):
        build_model(tiny_model("xl", adaptive_cutoffs=[20000]), task.vocab_size)


def test_tiny_lm_validation_perplexity_falls(tmp_path):
    data = write_wikitext(tmp_path / "wt", lines_per_split=(1500, 100, 100))
    res = run_cli(
        "task=wikitext103",
        f"task.data_dir={data}",
        f"task.cache_dir={tmp_path}/cache",
        "model=rmt",
        "mem=2",
        "model.bptt_depth=1",
        "backbone=tiny",
        "trainer=lm_cpu",
        "trainer.max_steps=150",
        "trainer.eval_every=50",
        "task.segment_len=16",
        "trainer.batch_size=8",
        "trainer.precision=fp32",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val/ppl"] for r in rows if "val/ppl" in r]
    assert len(ppl) == 3 and ppl[-1] < 0.7 * ppl[0], ppl
    assert "test ppl" in res.stdout.strip().splitlines()[-1]


def test_missing_data_is_one_line_naming_both_ways(tmp_path):
    res = run_cli(
        "task=wikitext103",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task.data_dir"), res.stderr
    assert "prepare_data.py" in lines[0] and "HF cache" in lines[0]


def test_bad_data_dir_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli(
        "task=wikitext103",
        f"task.data_dir={tmp_path}/empty",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and res.stderr.strip().startswith("error: task.data_dir:")
    assert "wiki.train.tokens" in res.stderr


def test_training_carries_state_across_batches_and_resets_each_epoch(tmp_path, monkeypatch):
    """The loop hands each batch the memory and BPTT history of the previous one (real calls, recorded)."""
    from rmt_bench.config import LoggerConfig, TrainerConfig
    from rmt_bench.logging import RunLogger
    from rmt_bench.train import loop

    task = build_task(lm_cfg(tmp_path, segment_len=16))
    model = build_model(tiny_model("rmt", bptt_depth=1), task.vocab_size)
    seen = []
    real = loop.train_segments

    def recording(*args, **kw):
        seen.append((args[6], len(args[7])))  # state, history handed in
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_segments", recording)
    per_epoch = task.steps_per_epoch(4)
    trainer = TrainerConfig(
        device="cpu",
        precision="fp32",
        max_steps=per_epoch + 2,
        eval_every=1000,
        batch_size=4,
        lr=1e-3,
        eval_batch_size=4,
    )
    logger = RunLogger(LoggerConfig(kind="none"), tmp_path / "run", {})
    loop.fit(model, task, trainer, logger, seed=0, device=torch.device("cpu"))
    logger.finish()
    assert seen[0] == (None, 0)
    assert seen[1][0] is not None and seen[1][0].memory is not None and seen[1][1] == 1
    assert seen[per_epoch] == (None, 0)  # a new epoch starts the stream again


def test_no_network_is_found_in_seconds_with_one_line(tmp_path):
    """Without HF_HUB_OFFLINE and with the Hub unreachable (a closed local port), the probe declares the Hub
    offline before `datasets` loads: one line naming the cause, no retries, no duplicated warnings."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    res = run_cli("task=wikitext103", "logger=none", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: task.data_dir: no WikiText-103 here: no network, and not in the Hugging Face")


def test_perplexity_by_position_and_by_document_segment_equal_a_direct_count(tmp_path):
    """From the one evaluation pass: each position's and each document segment's perplexity equal the mean
    nll of those targets counted by hand over a direct pass (per column, state carried), with documents starting
    at WikiText's level-1 headings."""
    import math

    from rmt_bench.tasks.wikitext import DOC_SEGMENTS, EOS

    data_dir = write_wikitext(tmp_path / "wt")
    with open(data_dir / "wiki.test.tokens", "a", encoding="utf-8") as f:  # sections are not documents
        f.write("\n = = Heading 1 = = \n\n the cat sat . \n" * 5)
    task = build_task(lm_cfg(tmp_path, data_dir=data_dir, segment_len=8))
    model = build_model(tiny_model("rmt_xl"), task.vocab_size).eval()
    got = task.evaluate(model, "test", 2, contextlib.nullcontext)
    cols = task.columns("test", 2)
    data = list(map(int, task.data["test"]))
    eq, eos = task.vocab.index("="), task.vocab.index(EOS)
    starts = [0] + [p for p in range(1, len(data) - 1) if data[p] == eq and data[p - 1] == eos and data[p + 1] != eq]
    assert len(starts) > 2  # the test split has headings: several documents
    pos, doc = {}, {}
    for b in range(2):
        state = model.initial_state()
        for i in range(0, cols.shape[1] - 1, 8):
            n = min(8, cols.shape[1] - 1 - i)
            with torch.no_grad():
                hidden, state = model(cols[b : b + 1, i : i + n][:, None], state)
                nll = model.head.nll(hidden.flatten(0, 2), cols[b, i + 1 : i + 1 + n]).tolist()
            for t, value in enumerate(nll):
                p = b * cols.shape[1] + i + 1 + t
                k = min((p - max(s for s in starts if s <= p)) // 8, DOC_SEGMENTS)
                pos.setdefault(t, []).append(value)
                doc.setdefault(k, []).append(value)
    mean = lambda xs: math.exp(sum(xs) / len(xs))  # noqa: E731
    assert got["ppl_by_position"] == pytest.approx([mean(pos[t]) for t in range(8)], rel=1e-5)
    expected_doc = [mean(doc[k]) if k in doc else None for k in range(DOC_SEGMENTS + 1)]
    assert [x is None for x in got["ppl_by_doc_segment"]] == [x is None for x in expected_doc]
    assert [x for x in got["ppl_by_doc_segment"] if x] == pytest.approx([x for x in expected_doc if x], rel=1e-5)
    all_nll = [v for vs in pos.values() for v in vs]
    assert got["ppl"] == pytest.approx(mean(all_nll), rel=1e-6)


def write_r_package(folder: Path, novels: dict[str, list[str]]) -> Path:
    """An R package's lazy-load data base as R writes one (data/Rdata.rdx, data/Rdata.rdb), with `rdata`."""
    import gzip
    import zlib

    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    def serialise(obj) -> bytes:  # R's serialize(): "X\n", then XDR
        return unparse_data(convert_python_to_r_data(obj), file_format="xdr", file_type="rds")

    blobs, offsets, at = [], {}, 0
    for name, lines in novels.items():
        raw = serialise(np.array(lines))
        blob = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        offsets[name] = np.array([at, len(blob)], dtype=np.int32)
        blobs.append(blob)
        at += len(blob)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "Rdata.rdb").write_bytes(b"".join(blobs))
    (folder / "data" / "Rdata.rdx").write_bytes(gzip.compress(serialise({"variables": offsets})))
    return folder


def test_austen_chapters_become_wikitext_documents_split_by_index(tmp_path):
    """prepare_data.py austen: the novels of an R package's data base, one document per chapter under a WikiText
    heading (so the loader finds the boundaries), words and punctuation apart, chapters 0, 20, ... test and 10,
    30, ... valid, rare words <unk>; then task=wikitext103 reads it with a document start at each chapter."""
    import subprocess
    import sys

    novel = ["EMMA", "", "By Jane Austen", ""]
    for k in range(25):
        novel += [f"CHAPTER {k + 1}", "", f"Emma Woodhouse, chapter {k}, was", "handsome and clever.", ""]
        novel += ["Mr. Knightley."]
    pkg = write_r_package(tmp_path / "janeaustenr", {"emma": novel, "persuasion": ["Persuasion", "", "Chapter 1", "",
                                                                                   "Anne Elliot."]})  # fmt: skip
    script = Path(__file__).resolve().parent.parent / "scripts" / "prepare_data.py"
    res = subprocess.run([sys.executable, str(script), "austen", str(pkg), str(tmp_path / "out")], capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    test = (tmp_path / "out" / "wiki.test.tokens").read_text().splitlines()
    assert test[:5] == ["", " = Emma , CHAPTER 1 = ", "", " Emma Woodhouse , chapter <unk> , was handsome and clever .",
                        " Mr . Knightley ."]  # fmt: skip
    assert [x for x in test if x.startswith(" = ")] == [" = Emma , CHAPTER 1 = ", " = Emma , CHAPTER 21 = "]
    valid = (tmp_path / "out" / "wiki.valid.tokens").read_text()
    assert valid.count(" = Emma , CHAPTER") == 1 and " = Emma , CHAPTER 11 = " in valid
    train = (tmp_path / "out" / "wiki.train.tokens").read_text()
    assert train.count(" = Emma , CHAPTER") == 22 and " = Persuasion , Chapter 1 = " in train
    assert "By Jane Austen" not in train + valid  # the title page is no chapter
    task = build_task(LMTaskConfig(data_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), segment_len=8))
    # the stream's start, then each chapter's heading (the first one after the file's opening blank line)
    assert len(task.document_starts("train")) == 1 + 23 and len(task.document_starts("test")) == 1 + 2
