"""Prepare data from files you downloaded, for `task.data_dir=DIR`.

    python scripts/prepare_data.py wikitext103 wikitext-103-v1.zip data/wikitext-103
    python scripts/prepare_data.py enwik8 enwik8.zip data/enwik8
    python scripts/prepare_data.py text data/mytext notes1.txt notes2.txt ...
    python scripts/prepare_data.py hyperpartisan articles-training-byarticle-20181122.xml \
        ground-truth-training-byarticle-20181122.xml hp-splits.json data/hyperpartisan
    python scripts/prepare_data.py austen /usr/lib/R/site-library/janeaustenr data/austen

wikitext103: extracts wiki.{train,valid,test}.tokens (the tokenised variant with <unk>, as Transformer-XL).
enwik8: the first 90M bytes train, the next 5M valid, the last 5M test, written as Transformer-XL's prep_enwik8
layout: byte values separated by spaces, a line break where the text has one.
text: any plain-text files, lines in order, cut 90/5/5 into wiki.{train,valid,test}.tokens (words are what
whitespace separates); as WikiText, words seen fewer than --min-count times in train become <unk> everywhere.
hyperpartisan (Table 3): the by-article articles and ground truth of SemEval 2019 task 4 (zenodo.org/record/
1489920, unzipped) and Longformer's split file (allenai/longformer, scripts/hp-splits.json: article ids for train
516 / dev 64 / test 65) -> {train,valid,test}.jsonl, one {"id", "text", "label"} per line (label 1: hyperpartisan);
the text is the article's text with its whitespace collapsed (no further cleaning).
austen (long documents for language modelling): Jane Austen's six novels as Debian's r-cran-janeaustenr ships
them (`apt-get install r-cran-janeaustenr`, or `apt-get download r-cran-janeaustenr && dpkg-deb -x *.deb x` without
R; the argument is the package's directory, holding data/Rdata.rdb and .rdx), read with the `rdata` package (the
`data` extra). A document is a chapter (269 of them, 2,700 words on average), opened by a WikiText heading
` = Emma , CHAPTER I = ` so that document boundaries are found as in WikiText; words and punctuation split apart
as WikiText writes them; chapters go to test / valid / train by their index (every 20th test, every 20th + 10
valid, the rest train); words seen fewer than --min-count times in train become <unk> everywhere.
Nothing is downloaded here; the archives come from the datasets' official pages.
"""

from __future__ import annotations

import argparse
import re
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


def prepare_hyperpartisan(articles: Path, truth: Path, splits: Path, out: Path) -> None:
    import json
    import xml.etree.ElementTree as ET

    texts = {
        int(a.attrib["id"]): " ".join(ET.tostring(a, method="text", encoding="unicode").split())
        for a in ET.parse(articles).getroot().iter("article")
    }
    truths = ET.parse(truth).getroot().iter("article")
    labels = {int(a.attrib["id"]): a.attrib["hyperpartisan"] == "true" for a in truths}
    if texts.keys() != labels.keys():
        sys.exit(f"error: {articles} and {truth} hold different article ids")
    for split, ids in json.loads(splits.read_text()).items():
        name = {"dev": "valid"}.get(split, split)
        missing = [i for i in ids if i not in texts]
        if missing:
            sys.exit(f"error: {splits}: {split} names ids not in {articles} (e.g. {missing[0]})")
        rows = [json.dumps({"id": i, "text": texts[i], "label": int(labels[i])}) for i in ids]
        (out / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        positive = sum(labels[i] for i in ids)
        print(f"wrote {out / f'{name}.jsonl'} ({len(ids)} articles, {positive} hyperpartisan)")


CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[IVXLC\d]+\.?\s*$")
WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


def read_r_lazyload(pkg_dir: Path) -> dict[str, list[str]]:
    """The character vectors of an R package's lazy-load data base (data/Rdata.rdx: a gzipped serialised index of
    offsets; data/Rdata.rdb: each object as a 4-byte length and a zlib-compressed serialisation), by name."""
    import gzip
    import zlib

    try:
        import rdata
    except ImportError:
        sys.exit("error: austen needs the rdata package: pip install -e '.[data]'")
    data = pkg_dir / "data"
    if not (data / "Rdata.rdx").is_file() or not (data / "Rdata.rdb").is_file():
        sys.exit(f"error: {pkg_dir} has no data/Rdata.rdx and data/Rdata.rdb (an installed R package's directory)")
    import warnings

    warnings.filterwarnings("ignore", message="Unknown file type")  # a lazy-load entry has no RDS header: expected

    def convert(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = convert(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    rdb = (data / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        out[str(name)] = [str(x) for x in convert(zlib.decompress(rdb[offset + 4 : offset + length]))]
    return out


def chapters(novels: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """-> (title, paragraphs) per chapter, in the novels' order; the text before a novel's first chapter (title
    page) is left out, and a paragraph is the lines between blank lines, joined."""
    out = []
    for lines in novels.values():
        title, current, para = next((x.strip() for x in lines if x.strip()), "?"), None, []
        for line in [*lines, ""]:
            if CHAPTER.match(line) or not line.strip():
                if para and current is not None:
                    current[1].append(" ".join(para))
                para = []
            if CHAPTER.match(line):
                current = (f"{title.title()} , {line.strip().rstrip('.')}", [])
                out.append(current)
            elif line.strip():
                para.append(line.strip())
    return out


def prepare_austen(pkg_dir: Path, out: Path, min_count: int = 3) -> None:
    docs = chapters(read_r_lazyload(pkg_dir))
    parts = {"train": [], "valid": [], "test": []}
    for i, doc in enumerate(docs):
        parts["test" if i % 20 == 0 else "valid" if i % 20 == 10 else "train"].append(doc)
    tokens = lambda text: " ".join(WORD.findall(text))  # noqa: E731
    counts = Counter(w for _, paras in parts["train"] for p in paras for w in tokens(p).split())
    for split, part in parts.items():
        lines = []
        for title, paras in part:
            lines += ["", f" = {tokens(title)} = ", ""]
            kept = (" ".join(w if counts[w] >= min_count else "<unk>" for w in tokens(p).split()) for p in paras)
            lines += [" " + text for text in kept]
        (out / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
        words = sum(len(tokens(p).split()) for _, paras in part for p in paras)
        print(f"wrote {out / f'wiki.{split}.tokens'} ({len(part)} chapters, {words:,} words)")


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
    p = sub.add_parser("austen")
    p.add_argument("package_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--min-count", type=int, default=3)
    p = sub.add_parser("hyperpartisan")
    for name in ("articles", "ground_truth", "splits", "out_dir"):
        p.add_argument(name, type=Path)
    args = parser.parse_args()
    sources = {"text": getattr(args, "files", None), "hyperpartisan": [getattr(args, k, None) for k in
               ("articles", "ground_truth", "splits")], "austen": []}.get(args.dataset)  # fmt: skip
    for path in [args.archive] if sources is None else sources:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "text":
        prepare_text(args.files, args.out_dir, args.min_count)
    elif args.dataset == "austen":
        prepare_austen(args.package_dir, args.out_dir, args.min_count)
    elif args.dataset == "hyperpartisan":
        prepare_hyperpartisan(args.articles, args.ground_truth, args.splits, args.out_dir)
    else:
        (prepare_wikitext if args.dataset == "wikitext103" else prepare_enwik8)(args.archive, args.out_dir)


if __name__ == "__main__":
    main()
