"""Tokenizers for the language models: BPE vocabulary sizes on Shakespeare, and caching a large
corpus with `bpe:N` in bounded memory.

1. `vocab`: for each N, byte-level BPE trained on train.txt (`dbcore.models.tokenizer.train_bpe`):
   training seconds, characters per token on train.txt and valid.txt, and the mean count of a
   token type in train.txt (how often the model sees each row of its embedding table).
2. `cache`: `dbcore cache` of a generated corpus of `--megabytes` (text files of Shakespeare's lines,
   shuffled per file by a seeded generator, so the corpus is not one text repeated) with a tiny MDLM
   config and `tokenizer = "bpe:N"`, in a child process whose peak anonymous resident memory
   (RssAnon) is sampled: against the target of 1 GiB for 1 GB of text.

    python benches/bench_tokenize.py --workdir /tmp/tok --json benches/results/tokenize.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"
FILE_MB = 64  # generated corpus: files of this many MB
TOML = """[model]
recipe = "mdlm"
tokenizer = "bpe:{n}"
seq_len = 128
dim = 32
depth = 2
heads = 2
num_blocks = 2

[train]
steps = 1
"""


def vocab_sizes(sizes: list[int]) -> list[dict]:
    from dbcore.models.tokenizer import train_bpe

    train = (SHARED / "train.txt").read_text(encoding="utf-8")
    valid = (SHARED / "valid.txt").read_text(encoding="utf-8")
    pieces = [train[i:i + (1 << 20)] for i in range(0, len(train), 1 << 20)]
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        tok = train_bpe(pieces, n)
        seconds = time.perf_counter() - t0
        ids = np.concatenate(tok.encode_batch(pieces))
        rows.append({"vocab_size": n, "train_seconds": round(seconds, 2),
                     "chars_per_token_train": round(len(train) / len(ids), 3),
                     "chars_per_token_valid": round(len(valid) / len(tok.encode(valid)), 3),
                     "mean_count_per_token": round(len(ids) / n, 1),
                     "tokens_seen_once_or_never": int((np.bincount(ids, minlength=n) <= 1).sum())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def make_corpus(folder: Path, megabytes: int) -> int:
    """Text files of shuffled Shakespeare lines, `megabytes` MB in all; returns the bytes written."""
    lines = (SHARED / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    total, k = 0, 0
    while total < megabytes * 10**6:
        size = min(FILE_MB * 10**6, megabytes * 10**6 - total)
        order = rng.permutation(len(lines))
        text, n = [], 0
        for i in np.resize(order, size // 8):  # more indices than any file needs
            text.append(lines[i])
            n += len(lines[i])
            if n >= size:
                break
        data = "".join(text).encode()
        (folder / f"part-{k:05d}.txt").write_bytes(data)
        total, k = total + len(data), k + 1
    return total


def cache_memory(workdir: Path, megabytes: int, n: int) -> dict:
    from dbcore.runs.process_memory import peak_rss_anon

    corpus = workdir / f"corpus_{megabytes}mb"
    if not corpus.is_dir():
        make_corpus(corpus, megabytes)
    size = sum(p.stat().st_size for p in corpus.iterdir())
    cfg = workdir / f"bpe{n}.toml"
    cfg.write_text(TOML.format(n=n))
    store = workdir / "store"
    cmd = [sys.executable, "-m", "dbcore.cli", "cache", str(cfg), "--data", f"text:{corpus}/*.txt",
           "--out", str(store), "--overwrite"]
    t0 = time.perf_counter()
    peak = peak_rss_anon(cmd)
    seconds = time.perf_counter() - t0
    from dbcore.data import store as store_mod

    text = store_mod.open(store).attrs["text"]
    return {"corpus_bytes": size, "files": len(list(corpus.iterdir())), "tokenizer": f"bpe:{n}",
            "tokens": text["num_tokens"], "seconds": round(seconds, 1),
            "mb_per_second": round(size / 1e6 / seconds, 2), "peak_rss_anon_mib": round(peak / 2**20, 1),
            "target_mib": 1024, "met": peak <= 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--megabytes", type=int, default=1000, help="generated corpus for the cache (MB)")
    ap.add_argument("--cache-vocab", type=int, default=1024)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = {"vocab": vocab_sizes([int(s) for s in args.sizes.split(",")])}
    result["cache"] = cache_memory(args.workdir, args.megabytes, args.cache_vocab)
    print(json.dumps(result["cache"]), flush=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
