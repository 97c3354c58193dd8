"""Peak memory of `python -m dtrain.export` for a bert-base-sized model (110M parameters, 12 layers, hidden 768).

A BertForSequenceClassification (random init, nothing downloaded) is saved as a dtrain checkpoint with its
AdamW state (as every run's checkpoint holds it), once as one file and once sharded (torch.distributed.checkpoint,
as FSDP writes it). Each case then runs in a fresh process, which measures its resident set after its imports,
resets the kernel's peak counter (/proc/self/clear_refs) and reports the peak (VmHWM) over the export alone
(torch, transformers and datasets imported before):

  export-single    dtrain.export from the single file (memory map, pages handed back once written): the
                   save_pretrained folder (config.json, model.safetensors, tokenizer)
  export-sharded   dtrain.export from the sharded folder (one tensor at a time through DCP), likewise
  weights-single   model.safetensors alone (what an image export writes), from the single file
  weights-sharded  model.safetensors alone, from the sharded folder
  gather-baseline  what export did before: the whole checkpoint loaded, then save_pretrained from the model

    python bench/export_memory.py [--reps 2] [--work /tmp/export_memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_RESULTS, ROOT, child_env, fresh_dir, machine_info, print_table,  # noqa: E402
                    write_bert_base_dir, write_json)

CASES = ("export-single", "export-sharded", "weights-single", "weights-sharded", "gather-baseline")


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(case: str, work: Path) -> None:
    """Child process: one case, its peak resident-set growth (MiB) printed as JSON."""
    import datasets  # noqa: F401 - the libraries are imported before the baseline is taken
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dtrain.workloads.bert  # noqa: F401
    from dtrain import export

    out = fresh_dir(work / f"out-{case}")
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current resident set
    if case == "gather-baseline":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        whole = torch.load(work / "single.pt", map_location="cpu", weights_only=True)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(work / "bert-base"))
        model.save_pretrained(out, state_dict=whole["model"])
    elif case.startswith("weights"):
        source = export.find_source(work / ("single.pt" if case == "weights-single" else "sharded"))
        export.write_safetensors(source, out / "model.safetensors")
    else:
        export.export(work / ("single.pt" if case == "export-single" else "sharded"), out)
    peak = kib("VmHWM")
    print(json.dumps({"case": case, "rss_before_mib": before / 1024, "peak_growth_mib": (peak - before) / 1024}))


def write_checkpoints(work: Path) -> dict[str, float]:
    """The bert-base model as a single-file and a sharded dtrain checkpoint; returns sizes in MiB."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dtrain import checkpoint as ckpt
    from dtrain.checkpointer import ModelAndOptimizer
    from dtrain.config import load_config, to_dict

    model_dir = write_bert_base_dir(work / "bert-base")
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=2))
    state = model.state_dict()
    optim = {"state": {n: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                       for n, p in model.named_parameters()}, "param_groups": [{"lr": 1e-4, "params": []}]}
    # data.train_files is not read: this config only rides in the checkpoint
    cfg = load_config(None, ["workload=bert", f"model.name_or_path={model_dir}", "data.train_files=train.csv"])
    meta = {"format_version": ckpt.FORMAT_VERSION, "scheduler": {}, "scaler": {}, "state": {}, "config": to_dict(cfg),
            "identity": {"workload": "bert", "labels": ["neg", "pos"], "num_labels": 2}}
    torch.save({**meta, "model": state, "optimizer": optim}, work / "single.pt")
    tensors, rest = ModelAndOptimizer.split(state, optim)
    fresh_dir(work / "sharded")
    dcp.save(tensors, checkpoint_id=work / "sharded", no_dist=True)
    torch.save({**meta, **rest}, work / "sharded" / ckpt.STATE_FILE)
    largest = max(t.numel() * t.element_size() for t in state.values())
    return {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "model_mib": sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
            "largest_tensor_mib": largest / 2**20,
            "checkpoint_file_mib": (work / "single.pt").stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/export_memory"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.work)
    fresh_dir(args.work)
    sizes = write_checkpoints(args.work)
    runs: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.reps):  # interleaved: a load change hits every case alike
        for case in CASES:
            done = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--measure", case],
                                  capture_output=True, text=True, env=child_env(2), cwd=ROOT, timeout=900)
            if done.returncode:
                raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
            runs[case].append(json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_mib"])
    rows = [[case, " / ".join(f"{v:.0f}" for v in values)] for case, values in runs.items()]
    table = print_table(f"Peak resident-set growth of an export, MiB (bert-base: {sizes['parameters_m']:.1f}M "
                        f"parameters, model {sizes['model_mib']:.0f} MiB, largest tensor "
                        f"{sizes['largest_tensor_mib']:.0f} MiB, checkpoint file {sizes['checkpoint_file_mib']:.0f} "
                        "MiB)", ["case", "peak growth per repetition"], rows)
    write_json(DEFAULT_RESULTS, "export_memory", {"machine": machine_info(), "sizes": sizes, "runs": runs,
                                                  "table": table})
    fresh_dir(args.work)


if __name__ == "__main__":
    main()
