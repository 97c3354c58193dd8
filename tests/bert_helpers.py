"""Tiny BERT models, vocabularies and text files for tests/test_bert.py, and a way to run train.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from conftest import finish, run_bounded, start_ranks, without_launcher_vars

REPO = Path(__file__).resolve().parents[1]

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "was", "plot", "actors", "and", "a", "very", "really", "story", "it"]
GENRES = {"action": ["chase", "explosion"], "comedy": ["joke", "laugh"], "drama": ["tears", "family"]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    words = POSITIVE + NEGATIVE + FILLER + [w for ws in GENRES.values() for w in ws]
    return SPECIAL + words + ["##s"]


def write_tiny_bert(directory: Path, *, weights: bool = True, tokenizer: bool = True,
                    max_positions: int = 64, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece vocab.txt; weights saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_positions)
    if weights:
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    if tokenizer:
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Short reviews: one or two sentiment words among filler words; label pos/neg from the majority."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        if rng.random() < 0.3:
            words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg"})
    rng.shuffle(rows)
    return rows


def varied_rows(n: int, seed: int) -> list[dict]:
    """sentiment_rows with 0-24 more filler words each: lengths that padding cares about."""
    rng = random.Random(seed)
    return [{**row, "text": " ".join([row["text"]] + rng.choices(FILLER, k=rng.randrange(25)))}
            for row in sentiment_rows(n, seed)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def genre_rows(n: int, seed: int) -> list[dict]:
    """Multi-label: each text mentions the keywords of 1-2 genres; labels = those genres (a list)."""
    rng = random.Random(seed)
    rows = []
    names = sorted(GENRES)
    for _ in range(n):
        chosen = sorted(rng.sample(names, rng.choice([1, 1, 2])))
        words = rng.sample(FILLER, 3) + [rng.choice(GENRES[g]) for g in chosen]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "genres": chosen})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def clean_env() -> dict[str, str]:
    """The test's environment without launcher variables (a test may itself run under torchrun or srun)."""
    return {**without_launcher_vars(os.environ), "PYTHONUNBUFFERED": "1"}


def run_train(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """train.py in a subprocess: plain python, or the real torchrun with `nproc` CPU processes (gloo)."""
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *args]
    return run_bounded(cmd, timeout, clean_env(), cwd=REPO)


def run_ranks(args: list[str], world_size: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """One train.py process per rank and no supervisor (as under srun): torchrun kills the other workers
    when one fails, which would hide a rank left waiting at a barrier; here every rank has to finish by
    itself before the timeout."""
    return finish(start_ranks(args, world_size), timeout=timeout)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def eval_records(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if r["kind"] == "eval"]
