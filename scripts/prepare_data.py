"""Prepare language-modelling data from archives you downloaded, for `task.data_dir=DIR`.

    python scripts/prepare_data.py wikitext103 wikitext-103-v1.zip data/wikitext-103
    python scripts/prepare_data.py enwik8 enwik8.zip data/enwik8
    python scripts/prepare_data.py text data/mytext notes1.txt notes2.txt ...

wikitext103: extracts wiki.{train,valid,test}.tokens (the tokenised variant with <unk>, as Transformer-XL).
enwik8: the first 90M bytes train, the next 5M valid, the last 5M test, written as Transformer-XL's prep_enwik8
layout: byte values separated by spaces, a line break where the text has one.
text: any plain-text files, lines in order, cut 90/5/5 into wiki.{train,valid,test}.tokens (words are what
whitespace separates); as WikiText, words seen fewer than --min-count times in train become <unk> everywhere.
Nothing is downloaded here; the archives come from the datasets' official pages.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections import Counter
from pathlib import Path

WT_NAMES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def prepare_wikitext(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = {Path(m).name: m for m in zf.namelist() if Path(m).name in WT_NAMES}
        missing = [n for n in WT_NAMES if n not in members]
        if missing:
            sys.exit(f"error: {archive} lacks {', '.join(missing)} (expected wikitext-103-v1.zip)")
        for name in WT_NAMES:
            (out / name).write_bytes(zf.read(members[name]))
            print(f"wrote {out / name}")


def prepare_enwik8(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        data = zf.read("enwik8")
    n_test = 5_000_000
    parts = {"train": data[: -2 * n_test], "valid": data[-2 * n_test : -n_test], "test": data[-n_test:]}
    for split, part in parts.items():
        text = " ".join("\n" if c == ord("\n") else str(c) for c in part)
        (out / f"{split}.txt").write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out / f'{split}.txt'} ({len(part):,} bytes)")


def prepare_text(files: list[Path], out: Path, min_count: int = 3) -> None:
    lines = []
    for path in files:
        lines += [" ".join(x.split()) for x in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    n_eval = max(len(lines) // 20, 1)
    parts = {"train": lines[: -2 * n_eval], "valid": lines[-2 * n_eval : -n_eval], "test": lines[-n_eval:]}
    counts = Counter(w for line in parts["train"] for w in line.split())
    for split, part in parts.items():
        text = "\n".join(" ".join(w if counts[w] >= min_count else "<unk>" for w in x.split()) for x in part)
        (out / f"wiki.{split}.tokens").write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out / f'wiki.{split}.tokens'} ({sum(len(x.split()) for x in part):,} words)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name in ("wikitext103", "enwik8"):
        p = sub.add_parser(name)
        p.add_argument("archive", type=Path)
        p.add_argument("out_dir", type=Path)
    p = sub.add_parser("text")
    p.add_argument("out_dir", type=Path)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--min-count", type=int, default=3)
    args = parser.parse_args()
    sources = args.files if args.dataset == "text" else [args.archive]
    for path in sources:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "text":
        prepare_text(args.files, args.out_dir, args.min_count)
    else:
        (prepare_wikitext if args.dataset == "wikitext103" else prepare_enwik8)(args.archive, args.out_dir)


if __name__ == "__main__":
    main()
