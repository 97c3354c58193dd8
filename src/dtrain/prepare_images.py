"""Write a resized copy of an image folder (ImageFolder layout), so the loader decodes smaller files.

    python -m dtrain.prepare_images SRC DST --short-side 256 --quality 90 [--workers N]

Every image under SRC is written to the same relative path under DST as a JPEG whose shorter side is
--short-side pixels (images already that small or smaller are re-encoded at their size; nothing is
enlarged). Files are written to a temporary name and renamed, so an interrupted run leaves no half file,
and a rerun skips what is done. Files that cannot be read are listed at the end; they do not stop the run.
Which short side keeps a preset's evaluation exact: docs/image.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dtrain.errors import EXIT_CONFIG, EXIT_INTERRUPTED

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}  # ImageFolder's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dtrain.prepare_images", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="image folder to read (e.g. /data/imagenet with train/ and val/)")
    p.add_argument("dst", type=Path, help="where the copy goes (created; files already there are kept)")
    p.add_argument("--short-side", type=int, required=True, help="shorter side of the written images, pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100 (default 90)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: cores)")
    return p.parse_args(argv)


def argument_problem(args: argparse.Namespace) -> str | None:
    src, dst = args.src.resolve(), args.dst.resolve()
    if not src.is_dir():
        return f"SRC {args.src} is not a folder: give the image folder to copy"
    if dst == src or src in dst.parents:
        return f"DST {args.dst} is inside SRC {args.src}: the copy must go elsewhere (SRC is never written to)"
    if dst in src.parents:
        return f"SRC {args.src} is inside DST {args.dst}: give a DST outside it"
    if dst.exists() and not dst.is_dir():
        return f"DST {args.dst} is a file: give a folder"
    if args.short_side < 1:
        return f"--short-side must be >= 1 pixel (got {args.short_side})"
    if not 1 <= args.quality <= 100:
        return f"--quality must be 1-100 (got {args.quality})"
    if args.workers < 1:
        return f"--workers must be >= 1 (got {args.workers})"
    return None


def images_to_write(src: Path, dst: Path) -> tuple[list[tuple[Path, Path]], int]:
    """(source, target) pairs whose target is missing, and how many targets exist already. A target keeps the
    relative path and takes the .jpg suffix (x.png -> x.jpg; an ImageFolder reads either)."""
    todo, done = [], 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in EXTENSIONS or not path.is_file():
            continue
        target = (dst / path.relative_to(src)).with_suffix(".jpg")
        if target.exists():
            done += 1
        else:
            todo.append((path, target))
    return todo, done


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def write_one(source: Path, target: Path, short_side: int, quality: int) -> str | None:
    """Write `target`; None when done, else why `source` could not be read."""
    try:
        with Image.open(source) as image:
            size = resized_size(*image.size, short_side)
            image.draft("RGB", size)  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that is still >= size
            image = image.convert("RGB")
            image = image.resize(size, Image.Resampling.BICUBIC) if size != image.size else image
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    image.save(partial, "JPEG", quality=quality)
    partial.replace(target)  # atomic: a killed run leaves a .tmp (removed by the next run), never a half .jpg
    return None


def remove_partials(dst: Path) -> None:
    for partial in dst.rglob(".*.tmp"):
        partial.unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dst.exists():
        remove_partials(args.dst)
    todo, done = images_to_write(args.src, args.dst)
    print(f"{args.src} -> {args.dst}: {len(todo)} image(s) to write, {done} already there; short side "
          f"{args.short_side}, quality {args.quality}, {args.workers} process(es)", flush=True)
    unreadable = []
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(write_one, s, t, args.short_side, args.quality) for s, t in todo]
            for (source, _), future in zip(todo, tqdm(futures, unit="img", disable=not todo)):
                reason = future.result()
                if reason:
                    unreadable.append((source, reason))
    except KeyboardInterrupt:
        print("interrupted: the images written so far are complete; run the same command again to finish",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    for source, reason in unreadable:
        print(f"unreadable (not copied): {source}: {reason}")
    print(f"done: {len(todo) - len(unreadable)} written, {done} already there, {len(unreadable)} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
