"""The docs cannot drift: the config reference is generated, every relative link resolves, the README stays short.

No shared helpers: this file reads Markdown and runs one `python -m dtrain.config --markdown`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_LINES = 250
REGENERATE = "python -m dtrain.config --markdown > docs/configuration.md"

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped but hyphens, underscores and spaces kept,
    spaces to hyphens. Links keep their text; backticks and emphasis marks are punctuation."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a Markdown text; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(text: str) -> list[str]:
    """Link targets in prose (not in code) that are neither absolute URLs nor mail addresses."""
    targets = []
    for line in prose_lines(text):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                targets.append(target)
    return targets


@pytest.mark.slow
def test_configuration_page_is_generated_from_the_config():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "dtrain.config", "--markdown"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = ROOT / "docs" / "configuration.md"
    assert page.exists(), f"docs/configuration.md is missing; generate it: {REGENERATE}"
    assert page.read_text() == done.stdout, f"docs/configuration.md is stale; regenerate it: {REGENERATE}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page.read_text()):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_readme_is_a_short_map():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, at most {README_MAX_LINES}: "
                                       "move the detail to a page under docs/ and link it")


def test_the_link_checker_itself():
    assert slug("SyncBatchNorm (`sync_bn=true`)") == "syncbatchnorm-sync_bntrue"
    assert slug("dtrain — one `train.py` for one CPU") == "dtrain--one-trainpy-for-one-cpu"
    assert slug("Sharded: `mode=fsdp` (FSDP2)") == "sharded-modefsdp-fsdp2"
    assert slug("See [Slurm](slurm.md) first") == "see-slurm-first"
    text = "[a](x.md#y) `[b](not-a-link.md)` [c](https://example.com) [d](#local)\n```\n# e\n[e](in-code.md)\n```\n"
    assert relative_links(text) == ["x.md#y", "#local"]
    assert anchors("# Setup\n## Setup\n```\n# not a heading\n```\n### `nproc=N`: local\n") == {
        "setup", "setup-1", "nprocn-local"}


# ---------------------------------------------------------------------------------------------
# Quoted errors and their exit codes: each is quoted on a page and produced by a real run

MNIST = ["--config", "configs/image/mnist_demo.yaml"]
SYNTHETIC = ["data.synthetic=true", "data.synthetic_train_size=16", "data.synthetic_val_size=4", "batch_size=4",
             "data.image_size=16", "model.arch=resnet18", "num_workers=0", "epochs=1"]
BERT = ["--config", "configs/bert/minilm_rotten_tomatoes.yaml"]
# (page, the quoted text, train.py's arguments, the exit code the page gives it)
QUOTED_ERRORS = [
    ("docs/checkpoints.md", "error: unknown config key 'optim.lrr' (did you mean 'lr'?)", [*MNIST, "optim.lrr=1"], 2),
    ("docs/checkpoints.md", "error: config key 'optim.lr' must be > 0, got -1.0", [*MNIST, "optim.lr=-1"], 2),
    ("docs/checkpoints.md", "error: data.validation_fraction must be between 0 and 1",
     [*BERT, "data.validation_fraction=1.5"], 2),
    ("docs/bert.md", "error: data.validation_fraction must be between 0 and 1", [*BERT, "data.validation_fraction=0"], 2),
    ("docs/checkpoints.md", "error: model.name_or_path 'no/such/model' is not a local directory",
     [*BERT, "model.name_or_path=no/such/model"], 1),
    ("docs/checkpoints.md", "error: fsdp.cpu_offload=true needs GPUs",
     [*MNIST, *SYNTHETIC, "mode=fsdp", "fsdp.cpu_offload=true", "nproc=2"], 2),
]


def squeeze(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
@pytest.mark.parametrize("page, quote, args, code", QUOTED_ERRORS,
                         ids=[f"{q[0]}: {q[1][7:40]}" for q in QUOTED_ERRORS])
def test_a_quoted_error_is_what_the_run_prints_with_the_exit_code_the_docs_give(page, quote, args, code, tmp_path):
    text = (ROOT / page).read_text()
    assert squeeze(quote) in squeeze(text), f"{page} no longer quotes {quote!r}: update QUOTED_ERRORS"
    table = (ROOT / "docs/checkpoints.md").read_text()
    assert re.search(rf"^\|\s*{code}\s*\|", table, re.M), f"exit code {code} is not in the table of docs/checkpoints.md"
    if "cpu_offload" in quote and torch_sees_a_gpu():
        pytest.skip("with a GPU fsdp.cpu_offload is allowed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "train.py", *args, f"output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(quote), done.stderr[-3000:]
    assert done.returncode == code, f"exit code {done.returncode}, the docs say {code}:\n{done.stderr[-3000:]}"


def torch_sees_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Figures name their result files, and those files exist

RESULT_FILE = re.compile(r"bench/results/([\w.-]+\.(?:md|json))")


def named_result_files(text: str) -> list[str]:
    """bench/results/<file> names in a page, prose and code alike; `<date>-...` patterns are not names."""
    return RESULT_FILE.findall(text)


@pytest.mark.parametrize("page", PAGES + [ROOT / "bench" / "README.md"],
                         ids=[str(p.relative_to(ROOT)) for p in PAGES + [ROOT / "bench" / "README.md"]])
def test_every_named_result_file_exists(page):
    missing = [name for name in named_result_files(page.read_text())
               if not (ROOT / "bench" / "results" / name).is_file()]
    assert not missing, f"{page.relative_to(ROOT)} names result files that are not in bench/results/: {missing}"


def test_the_result_file_finder_itself():
    text = ("`bench/results/2026-11-30-overhead-cpu.md`, (bench/results/2026-11-22-gpu-h100-notes.md) and "
            "`bench/results/<date>-scaling-cpu.md`")
    assert named_result_files(text) == ["2026-11-30-overhead-cpu.md", "2026-11-22-gpu-h100-notes.md"]


# ---------------------------------------------------------------------------------------------
# Benchmark durations: the Makefile, bench/README.md, bench/run_all.py and docs/performance.md say the same

DURATION = re.compile(r"~(\d+(?:\.\d+)?) min")
BENCH_PAGES = ["Makefile", "bench/README.md", "bench/run_all.py", "docs/performance.md"]


def bench_durations() -> dict[str, set[float]]:
    """Minutes quoted for `make bench` (run_all.py) and for its --quick smoke run, on every line that names them."""
    found: dict[str, set[float]] = {"full": set(), "quick": set()}
    for name in BENCH_PAGES:
        for line in (ROOT / name).read_text().splitlines():
            if ("make bench" in line or "run_all.py" in line) and (m := DURATION.search(line)):
                found["quick" if "--quick" in line else "full"].add(float(m.group(1)))
    return found


def script_duration(text: str, script: str) -> set[float]:
    return {float(m.group(1)) for line in text.splitlines() if f"bench/{script}.py " in line
            and "--" not in line.split("#")[0] for m in [DURATION.search(line)] if m}


def test_benchmark_durations_agree_everywhere():
    found = bench_durations()
    assert len(found["full"]) == 1 and len(found["quick"]) == 1, f"make bench durations disagree: {found}"
    page = (ROOT / "docs" / "performance.md").read_text()
    parts = []
    for script in ("overhead", "scaling", "trainer"):
        own = script_duration((ROOT / "bench" / f"{script}.py").read_text(), script)
        documented = script_duration(page, script)
        assert len(own) == 1 and own == documented, f"bench/{script}.py says {own}, docs/performance.md {documented}"
        parts.append(own.pop())
    assert abs(sum(parts) - found["full"].pop()) <= 1, f"make bench runs the three scripts: {parts}"
