"""A small random Hugging Face model with a word-level tokenizer built from your text, saved into a directory: the
offline stand-in for a Hub model (`backbone=hf model.hf_name=DIR`; the CPU scale of Table 3).

    python scripts/make_tiny_hf.py bert data/tiny-bert data/hyperpartisan/train.jsonl
    python scripts/make_tiny_hf.py gpt2 data/tiny-gpt2 notes.txt --vocab 5000

Text comes from .jsonl files (their "text" fields) or plain text files. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmt_bench.models.hf import make_tiny


def read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        texts += [json.loads(x)["text"] for x in lines if x.strip()] if path.suffix == ".jsonl" else lines
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=["bert", "gpt2"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("texts", type=Path, nargs="+")
    parser.add_argument("--vocab", type=int, default=2000, help="tokenizer vocabulary (words), default 2000")
    parser.add_argument("--width", type=int, default=64, help="hidden size, default 64")
    args = parser.parse_args()
    out = make_tiny(args.family, args.out_dir, read_texts(args.texts), args.vocab, args.width)
    print(f"wrote {out} (a {args.family} of width {args.width} and its tokenizer)")


if __name__ == "__main__":
    main()
