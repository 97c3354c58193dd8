"""Tiny BERT models, vocabularies and text files for tests/test_bert.py (running train.py: helpers.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
