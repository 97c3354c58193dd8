"""The BERT workload, as a specification. A 2-layer BERT (hidden 32) with a WordPiece vocabulary the
test writes, on generated reviews: 96 training rows and 37 validation rows (odd, so 2 ranks get
19 and 18). Multi-process runs use the real launcher (python -m torch.distributed.run) on CPU/gloo.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bert_helpers import genre_rows, sentiment_rows, varied_rows, write_csv, write_jsonl, write_tiny_bert
from helpers import (PATCHED_TRAIN, ROOT, error_lines, max_difference, records, run_ranks, run_torchrun, run_train,
                     start, wait_until, weights)

VAL_ROWS = 37


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Model and data shared by the tests of this file (nothing under it is changed by a test)."""
    root = tmp_path_factory.mktemp("bert")
    write_tiny_bert(root / "model")
    write_csv(root / "train.csv", sentiment_rows(96, seed=0))
    write_csv(root / "val.csv", sentiment_rows(VAL_ROWS, seed=1))
    write_jsonl(root / "genres_train.jsonl", genre_rows(96, seed=0))
    write_jsonl(root / "genres_val.jsonl", genre_rows(VAL_ROWS, seed=1))
    write_csv(root / "varied_train.csv", varied_rows(96, seed=2))
    write_csv(root / "varied_val.csv", varied_rows(VAL_ROWS, seed=3))
    return root


def tiny_args(ws: Path, out: Path, *extra: str, cache: str = "cache") -> list[str]:
    return ["workload=bert", f"model.name_or_path={ws / 'model'}", "model.max_length=32", "model.dropout=0",
            f"data.train_files={ws / 'train.csv'}", f"data.validation_files={ws / 'val.csv'}",
            f"data.cache_dir={ws / cache}", f"output_dir={out}", "num_workers=0", "log_every=4",
            "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01", "optim.schedule=linear",
            "optim.warmup_steps=2", "optim.grad_clip=1.0", "epochs=3", *extra]


def check_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n" \
                                   f"stderr:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def single_run(ws: Path) -> Path:
    """One process, batch 8, 3 epochs (36 steps)."""
    out = ws / "run_single"
    check_ok(run_train(tiny_args(ws, out, "batch_size=8"), timeout=240))
    return out


@pytest.fixture(scope="module")
def ddp_run(ws: Path) -> Path:
    """Two DDP processes, batch 4 each: the same 8 samples per step as single_run. Own datasets cache."""
    out = ws / "run_ddp"
    check_ok(run_torchrun(tiny_args(ws, out, "batch_size=4", cache="cache_ddp")))
    return out


# ---------------------------------------------------------------------------------------------
# Training runs


@pytest.mark.slow
def test_single_process_run_learns_and_counts_every_validation_example(single_run: Path):
    evals = records(single_run, "eval")
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert all(r["samples"] == VAL_ROWS for r in evals)
    assert evals[-1]["accuracy"] >= 0.9  # the sentiment words decide the label: a tiny BERT learns it
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert 0.0 <= evals[-1]["macro_f1"] <= 1.0


@pytest.mark.slow
def test_two_process_ddp_run_finishes_with_exact_eval_count(ddp_run: Path):
    # find_unused_parameters is off (the default): BERT's classifier uses every parameter, pooler included,
    # or DDP would have failed on the second step.
    evals = records(ddp_run, "eval")
    assert len(evals) == 3
    assert all(r["samples"] == VAL_ROWS for r in evals)  # 19 + 18, no padding duplicates
    assert len(list((ddp_run / "checkpoints").glob("step_*.pt"))) >= 1


@pytest.mark.slow
def test_two_ranks_match_one_process(ws: Path, single_run: Path, ddp_run: Path):
    """Dropout off, same global batch: 2 x 4 under DDP ends where 1 x 8 does (AdamW, 36 steps)."""
    single, ddp = weights(single_run), weights(ddp_run)
    assert max_difference(single, ddp) < 1e-5
    initial = initial_bert_weights(ws)
    moved = max((single[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-2  # the comparison means something: training changed the weights
    for a, b in zip(records(single_run, "eval"), records(ddp_run, "eval")):
        assert a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_export_the_whole_model(ws: Path, single_run: Path, tmp_path: Path):
    """FSDP shards each encoder layer over 2 ranks (batch 4 each): it ends where 1 x 8 does, and the
    exported model (gathered from the shards) is the checkpoint's model."""
    from safetensors.torch import load_file

    from dtrain.checkpoint import consolidate

    out = tmp_path / "fsdp"
    check_ok(run_torchrun(tiny_args(ws, out, "batch_size=4", "mode=fsdp", cache="cache_fsdp")))
    assert (out / "checkpoints" / "last").is_symlink()  # a sharded checkpoint
    sharded = torch.load(consolidate(out / "checkpoints" / "last", tmp_path / "whole.pt"), weights_only=True)
    assert max_difference(weights(single_run), sharded["model"]) < 1e-5
    for a, b in zip(records(single_run, "eval"), records(out, "eval")):
        assert a["samples"] == b["samples"] == VAL_ROWS and a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert max_difference({k: v for k, v in sharded["model"].items() if k in exported}, exported) == 0.0
    assert len(exported) >= len(sharded["model"]) - 2  # every weight (buffers such as position ids aside)


def initial_bert_weights(ws: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {"bert." + k: v for k, v in load_file(str(ws / "model" / "model.safetensors")).items()}


@pytest.mark.slow
def test_ranks_tokenize_once_and_share_the_cache(ddp_run: Path, ws: Path):
    """Rank 0 tokenizes first; rank 1 finds the same fingerprint in the cache instead of tokenizing again."""
    tokenized = [p for p in (ws / "cache_ddp").rglob("cache-*.arrow")]
    assert len(tokenized) == 2, tokenized  # one per split (train, validation), not one per split per rank


@pytest.mark.slow
def test_eval_metrics_equal_an_independent_computation(ddp_run: Path, ws: Path):
    """Accuracy and macro-F1 reduced over 2 ranks equal those of the exported model on the whole file."""
    rows = read_csv(ws / "val.csv")
    logits = exported_logits(ddp_run / "model", [r["text"] for r in rows])
    names = ["neg", "pos"]
    truth = torch.tensor([names.index(r["label"]) for r in rows])
    preds = logits.argmax(dim=1)
    f1 = [2 * ((preds == c) & (truth == c)).sum().item()
          / ((preds == c).sum().item() + (truth == c).sum().item()) for c in range(2)]
    last = records(ddp_run, "eval")[-1]
    assert last["accuracy"] == pytest.approx((preds == truth).double().mean().item(), abs=1e-12)
    assert last["macro_f1"] == pytest.approx(sum(f1) / 2, abs=1e-12)
    loss = torch.nn.functional.cross_entropy(logits, truth).item()
    assert last["loss"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.slow
def test_saved_pretrained_model_loads_back_with_the_same_logits(single_run: Path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_dir = single_run / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    config = AutoConfig.from_pretrained(model_dir)
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    assert config.problem_type == "single_label_classification"
    # The checkpoint's model (the unwrapped state_dict) and the exported one give the same logits.
    from_checkpoint = AutoModelForSequenceClassification.from_config(config)
    from_checkpoint.load_state_dict(weights(single_run))
    texts = ["the movie was great fun", "dull and boring plot", "unknownword film"]
    tokens = tokenize(model_dir, texts)
    from_checkpoint.eval()
    with torch.no_grad():
        expected = from_checkpoint(**tokens).logits
    got = exported_logits(model_dir, texts)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.argmax(dim=1).tolist()[:2] == [1, 0]  # it learned: positive, then negative


@pytest.mark.slow
def test_resume_mid_epoch_ends_where_an_uninterrupted_run_ends(ws: Path, tmp_path: Path):
    common = ("batch_size=8", "epochs=2", "optim.schedule=constant", "optim.warmup_steps=0", "resume=auto")
    check_ok(run_train(tiny_args(ws, tmp_path / "straight", *common), timeout=240))
    # 12 steps per epoch
    stopped = run_train(tiny_args(ws, tmp_path / "resumed", *common, "max_steps=5"), timeout=240)
    check_ok(stopped)
    resumed = run_train(tiny_args(ws, tmp_path / "resumed", *common), timeout=240)
    check_ok(resumed)
    assert "resumed from" in resumed.stdout and "step 5" in resumed.stdout
    assert max_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
    assert records(tmp_path / "resumed", "eval")[-1]["step"] == 24


def varied(ws: Path) -> list[str]:
    return [f"data.train_files={ws / 'varied_train.csv'}", f"data.validation_files={ws / 'varied_val.csv'}"]


@pytest.mark.slow
def test_length_grouped_run_killed_mid_epoch_on_two_ranks_resumes_exactly(ws: Path, tmp_path: Path):
    """SIGKILL of the whole 2-rank job in the middle of epoch 2 (during a checkpoint write); the restarted job
    skips exactly what was trained, so it ends with the weights of an uninterrupted run."""
    import psutil

    common = (*varied(ws), "batch_size=4", "epochs=2", "optim.schedule=constant", "optim.warmup_steps=0",
              "resume=auto", "checkpoint_every=4", "data.group_by_length=true")
    check_ok(run_torchrun(tiny_args(ws, tmp_path / "straight", *common)))
    out = tmp_path / "killed"
    # 12 steps per epoch; file saves at steps 4, 8, 12, the epoch end, 16, then 20: rank 0 hangs writing that one.
    job = start(tiny_args(ws, out, *common), script=PATCHED_TRAIN, nproc=2, HANG_ON_SAVE="6")
    wait_until(lambda: list((out / "checkpoints").glob("*.hanging")), job, timeout=180, what="the step-20 save")
    for proc in [*psutil.Process(job.pid).children(recursive=True), job]:  # both ranks and the launcher at once
        proc.kill()
    job.communicate()
    resumed = run_torchrun(tiny_args(ws, out, *common))
    check_ok(resumed)
    assert "resumed from" in resumed.stdout and "epoch 1, step 16" in resumed.stdout  # mid-epoch 2
    assert max_difference(weights(tmp_path / "straight"), weights(out)) < 1e-6
    assert all(r["samples"] == VAL_ROWS for r in records(out, "eval"))


@pytest.mark.slow
def test_mid_epoch_resume_with_another_global_batch_trains_the_rest_of_the_grouped_epoch_once(ws: Path,
                                                                                            tmp_path: Path):
    """Length groups follow the global batch: batch 3 continues batch 8's epoch order (56 left: 18 steps of 3
    and one of 2), then groups its own epochs."""
    from collections import Counter

    from dtrain import ledger

    common = (*varied(ws), "epochs=2", "resume=auto", "data.group_by_length=true", "record_samples=true")
    check_ok(run_train(tiny_args(ws, tmp_path, *common, "batch_size=8", "max_steps=5"), timeout=240))
    resumed = run_train(tiny_args(ws, tmp_path, *common, "batch_size=3"), timeout=240)
    check_ok(resumed)
    assert "remaining samples after 40 are dealt over 1 process(es)" in resumed.stdout
    rows = ledger.read(tmp_path)[0]
    assert Counter(rows["index"][rows["epoch"] == 0].tolist()) == Counter(range(96))
    assert sorted(Counter(rows["step"][rows["epoch"] == 0].tolist()).values()) == [2] + [3] * 18 + [8] * 5


def test_grouping_by_length_pads_less_and_evaluates_every_example(ws: Path, tmp_path: Path):
    """The BERT task hands its token counts to the loaders: fewer pad tokens per example, same examples."""
    from dtrain.data import make_loaders
    from dtrain.dist import DistEnv
    from dtrain.workloads import bert

    env = DistEnv(mode="single", device=torch.device("cpu"))
    seen = {}
    for grouping in ("true", "false"):
        cfg = in_process_config(ws, tmp_path, *varied(ws), "batch_size=8", f"data.group_by_length={grouping}")
        task = bert.build(cfg, env)
        assert (task.loading.lengths is not None) == (grouping == "true")
        train, sampler, val = make_loaders(task, cfg, env)
        sampler.start_epoch(0)
        batches = list(train)
        pads = sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(len(b["labels"]) for b in batches)
        seen[grouping] = (pads, sorted(i for _, i in sampler), sum(len(b["labels"]) for b in val))
    assert seen["true"][0] < seen["false"][0] / 2, seen  # 96 examples: megabatches of only 24 to sort
    assert seen["true"][1] == seen["false"][1] == list(range(96))  # the same examples, once each
    assert seen["true"][2] == seen["false"][2] == VAL_ROWS


@pytest.mark.slow
def test_multi_label_from_jsonl_lists(ws: Path, tmp_path: Path):
    out = tmp_path / "genres"
    check_ok(run_train(tiny_args(ws, out, "model.problem_type=multi_label", "data.label_column=genres",
                                 f"data.train_files={ws / 'genres_train.jsonl'}",
                                 f"data.validation_files={ws / 'genres_val.jsonl'}",
                                 "batch_size=8", "epochs=4", "optim.lr=0.01"), timeout=240))
    evals = records(out, "eval")
    assert all(r["samples"] == VAL_ROWS for r in evals)
    assert evals[-1]["loss"] < evals[0]["loss"]
    # Independent check of exact-match accuracy and per-label F1 from the exported model.
    rows = [__import__("json").loads(line) for line in (ws / "genres_val.jsonl").read_text().splitlines()]
    names = ["action", "comedy", "drama"]
    truth = torch.tensor([[float(n in r["genres"]) for n in names] for r in rows]) > 0.5
    preds = exported_logits(out / "model", [r["text"] for r in rows]) > 0
    last = evals[-1]
    assert last["accuracy"] == pytest.approx((preds == truth).all(dim=1).double().mean().item(), abs=1e-12)
    for i, name in enumerate(names):
        tp = (preds[:, i] & truth[:, i]).sum().item()
        denominator = 2 * tp + (preds[:, i] & ~truth[:, i]).sum().item() + (~preds[:, i] & truth[:, i]).sum().item()
        assert last[f"f1_{name}"] == pytest.approx(2 * tp / denominator, abs=1e-12)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").problem_type == "multi_label_classification"


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, no traceback


def bad_cases(ws: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra overrides, text the error line must contain)."""
    return {
        "missing text column": (["data.text_columns=review"], "its columns are text, label"),
        "missing label column": (["data.label_column=sentiment"], "no column 'sentiment'"),
        "empty file": ([f"data.train_files={ws / 'empty.csv'}"], "is empty"),
        "header only": ([f"data.train_files={ws / 'header_only.csv'}"], "holds no rows"),
        "label not in data.labels": (["data.labels=negative,positive"], "not one of data.labels"),
        "label id out of range": ([f"data.train_files={ws / 'int_labels.csv'}", "data.labels=a,b"],
                                  "is not an id 0..1"),
        "float labels": ([f"data.train_files={ws / 'float_labels.csv'}"], "integer ids 0..K-1 or label names"),
        "no tokenizer": ([f"model.name_or_path={ws / 'no_tokenizer'}"], "has no tokenizer"),
        "hub name, not a directory": (["model.name_or_path=bert-base-uncased"], "nothing is downloaded"),
        "max_length above position limit": (["model.max_length=65"], "above the model's position limit 64"),
    }


@pytest.fixture(scope="module")
def bad_ws(ws: Path) -> Path:
    (ws / "empty.csv").write_text("")
    (ws / "header_only.csv").write_text("text,label\n")
    write_csv(ws / "int_labels.csv", [{"text": "good movie", "label": i % 3} for i in range(20)])
    write_csv(ws / "float_labels.csv", [{"text": "good movie", "label": i / 2} for i in range(20)])
    write_tiny_bert(ws / "no_tokenizer", tokenizer=False)
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing text column", "missing label column", "empty file", "header only",
                                  "label not in data.labels", "label id out of range", "float labels",
                                  "no tokenizer", "hub name, not a directory", "max_length above position limit"])
def test_bad_input_is_one_clear_error_line(bad_ws: Path, tmp_path: Path, case: str):
    extra, expected = bad_cases(bad_ws)[case]
    result = run_train(tiny_args(bad_ws, tmp_path / "out", *extra), timeout=240)
    errors = error_lines(result.stderr)
    assert result.returncode != 0
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_input_on_two_ranks_stops_both_without_waiting(bad_ws: Path, tmp_path: Path):
    """Rank 0 meets the error while preparing the data first; rank 1 must not wait for it at a barrier.

    The ranks run without torchrun (as under srun), so nothing kills a rank left waiting: each one
    has to exit by itself, long before the 120 s collective timeout.
    """
    start = time.monotonic()
    results = run_ranks(tiny_args(bad_ws, tmp_path / "out", "data.label_column=sentiment", "timeout_s=120"))
    assert time.monotonic() - start < 90
    assert [r.returncode for r in results] == [1, 1]
    errors = [error_lines(r.stderr) for r in results]
    assert len(errors[0]) == 1 and "no column 'sentiment'" in errors[0][0], results[0].stderr
    # Rank 1 stops on rank 0's verdict, silently (an error every rank shares is reported once), not
    # because its connection to a vanished rank 0 broke ("lost contact with another rank").
    assert results[1].stderr.strip() == "", results[1].stderr
    assert not any("Traceback" in r.stderr for r in results)


# ---------------------------------------------------------------------------------------------
# Pieces, in process


def test_presets_are_valid_configs():
    from dtrain.config import load_config

    demo = load_config(str(ROOT / "configs/bert/minilm_rotten_tomatoes.yaml"), [])
    assert demo.workload == "bert" and demo.optim.name == "adamw" and demo.optim.schedule == "linear"
    assert demo.model.name_or_path == "data/rotten_tomatoes/all-MiniLM-L6-v2"
    full = load_config(str(ROOT / "configs/bert/bert_base_sst2.yaml"),
                       ["model.name_or_path=/models/bert-base-uncased", "data.train_files=a.parquet"])
    assert full.model.name_or_path == "/models/bert-base-uncased" and full.data.train_files == ["a.parquet"]
    assert full.data.text_columns == ["sentence"]


def test_sentence_pairs_seeded_split_and_sampling(ws: Path, tmp_path: Path):
    from dtrain.workloads import bert

    rows = [{"premise": r["text"], "hypothesis": "the movie", "label": i % 2}
            for i, r in enumerate(sentiment_rows(50, seed=3))]
    write_csv(tmp_path / "pairs.csv", rows)
    cfg = in_process_config(ws, tmp_path, f"data.train_files={tmp_path / 'pairs.csv'}", "data.validation_files=[]",
                            "data.validation_fraction=0.2", "data.text_columns=premise,hypothesis",
                            "data.max_train_samples=30")
    tokenizer = load_tokenizer(ws)
    data = bert.prepare_data(cfg, tokenizer)
    again = bert.prepare_data(cfg, tokenizer)
    assert (len(data.train), len(data.val)) == (30, 10)
    assert data.labels.names == ["0", "1"] and data.labels.kind == "int"
    assert data.train["input_ids"] == again.train["input_ids"]  # the split and the sample are seeded
    first = data.train[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert 1 in first["token_type_ids"] and first["input_ids"].count(tokenizer.sep_token_id) == 2  # a pair


def test_file_formats_and_compression(ws: Path, tmp_path: Path):
    """The same rows as csv.gz, tsv (quotes kept as text), jsonl.bz2 and parquet give the same examples."""
    import bz2
    import gzip
    import json

    import pandas as pd

    from dtrain.workloads import bert

    rows = sentiment_rows(20, seed=5)
    rows[0]["text"] = 'a "quoted" word'
    frame = pd.DataFrame(rows)
    with gzip.open(tmp_path / "d.csv.gz", "wt") as f:
        frame.to_csv(f, index=False)
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    with bz2.open(tmp_path / "d.jsonl.bz2", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    frame.to_parquet(tmp_path / "d.parquet")
    tokenizer = load_tokenizer(ws)
    results = []
    for name in ("d.csv.gz", "d.tsv", "d.jsonl.bz2", "d.parquet"):
        cfg = in_process_config(ws, tmp_path, f"data.train_files={tmp_path / name}",
                                f"data.validation_files={tmp_path / name}")
        data = bert.prepare_data(cfg, tokenizer)
        results.append((data.val["input_ids"], data.val["labels"]))
    assert all(r == results[0] for r in results[1:])
    assert len(results[0][0]) == 20 and results[0][1][0] == ["neg", "pos"].index(rows[0]["label"])


def test_drop_labels_and_multi_label_cells_in_csv(ws: Path, tmp_path: Path):
    from dtrain.workloads import bert

    rows = [{"text": "chase joke", "genres": "action|comedy"}, {"text": "tears", "genres": "drama"},
            {"text": "plot", "genres": "synopsis"}, {"text": "laugh", "genres": "comedy"}]
    write_csv(tmp_path / "g.csv", rows)
    cfg = in_process_config(ws, tmp_path, f"data.train_files={tmp_path / 'g.csv'}",
                            f"data.validation_files={tmp_path / 'g.csv'}", "model.problem_type=multi_label",
                            "data.label_column=genres", "data.drop_labels=synopsis")
    data = bert.prepare_data(cfg, load_tokenizer(ws))
    assert data.labels.names == ["action", "comedy", "drama"]
    assert data.val["labels"] == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_macro_f1_from_reduced_sums():
    from dtrain.workloads import bert

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # Two "ranks" with two examples each: summed sums give the same metrics as one batch of four.
    halves = [bert.single_label_sums(logits[i:i + 2], labels[i:i + 2], 3) for i in (0, 2)]
    summed = {k: float(halves[0][k]) + float(halves[1][k]) for k in halves[0]}
    metrics = bert.make_summarize(["a", "b", "c"], multi=False)(summed)
    # class a: tp 1, fp 1, fn 1 -> F1 0.5; class b: the same; class c never occurs nor is predicted -> left out
    assert metrics["accuracy"] == 0.5 and metrics["samples"] == 4
    assert metrics["macro_f1"] == pytest.approx(0.5)
    whole = bert.single_label_sums(logits, labels, 3)
    assert metrics["loss"] == pytest.approx(float(whole["loss_sum"]) / 4)


def test_no_weight_decay_for_biases_and_layernorm(ws: Path, tmp_path: Path):
    from dtrain.dist import DistEnv
    from dtrain.optim import build_optimizer
    from dtrain.workloads import bert

    cfg = in_process_config(ws, tmp_path)
    task = bert.build(cfg, DistEnv(mode="single", device=torch.device("cpu")))
    optimizer = build_optimizer(task.model, cfg.optim, task.is_no_decay)
    names = {id(p): n for n, p in task.model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "classifier.bias" in no_decay
    assert all(n.endswith("weight") and "LayerNorm" not in n for n in decay)
    assert "bert.pooler.dense.weight" in decay and len(decay) + len(no_decay) == len(names)


def test_random_init_needs_only_config_and_vocab(ws: Path, tmp_path: Path):
    from dtrain.dist import DistEnv
    from dtrain.errors import UserError
    from dtrain.workloads import bert

    bare = write_tiny_bert(tmp_path / "bare", weights=False)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "vocab.txt"]
    env = DistEnv(mode="single", device=torch.device("cpu"))
    cfg = in_process_config(ws, tmp_path, f"model.name_or_path={bare}", "model.random_init=true")
    task = bert.build(cfg, env)
    assert type(task.model).__name__ == "BertForSequenceClassification"
    assert task.identity["num_labels"] == 2 and task.identity["labels"] == ["neg", "pos"]
    with pytest.raises(UserError, match="has no weights"):
        bert.build(in_process_config(ws, tmp_path, f"model.name_or_path={bare}"), env)


def test_dynamic_padding_to_multiple_of_8_on_gpu(ws: Path):
    from dtrain.workloads import bert

    tokenizer = load_tokenizer(ws)
    items = [dict(tokenizer(text), labels=0) for text in ("good", "the movie was really good fun")]
    cpu = bert.make_collate(tokenizer, torch.device("cpu"))(items)
    gpu = bert.make_collate(tokenizer, torch.device("cuda"))(items)  # only decides the padding; nothing moves
    assert type(cpu) is dict and cpu["input_ids"].shape == (2, 8)  # longest: [CLS] + 6 words + [SEP]
    assert gpu["input_ids"].shape == (2, 8)  # already a multiple of 8
    longer = [dict(tokenizer("the movie was really good fun and the plot"), labels=1)] + items
    assert bert.make_collate(tokenizer, torch.device("cuda"))(longer)["input_ids"].shape == (3, 16)
    assert bert.make_collate(tokenizer, torch.device("cpu"))(longer)["input_ids"].shape == (3, 11)
    assert cpu["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_parameters_a_head_ignores_are_frozen(ws: Path):
    """A head on the [CLS] state leaves BERT's pooler unused: it is frozen, so DDP needs no unused scan."""
    from types import SimpleNamespace

    from transformers import AutoConfig, BertModel

    from dtrain.workloads import bert

    class ClsHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(AutoConfig.from_pretrained(ws / "model"))
            self.head = torch.nn.Linear(32, 2)

        def forward(self, **inputs):
            return SimpleNamespace(logits=self.head(self.bert(**inputs).last_hidden_state[:, 0]))

    model = ClsHead()
    frozen = bert.freeze_unused_parameters(model, load_tokenizer(ws), num_texts=1)
    assert frozen == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert not model.bert.pooler.dense.weight.requires_grad and model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    from transformers import AutoModelForSequenceClassification

    full = AutoModelForSequenceClassification.from_pretrained(ws / "model", num_labels=2)
    assert bert.freeze_unused_parameters(full, load_tokenizer(ws), num_texts=2) == []


def test_demo_data_is_written_from_the_installed_packages(tmp_path: Path):
    import csv

    from dtrain.demo_data import write_rotten_tomatoes

    write_rotten_tomatoes(tmp_path)
    with open(tmp_path / "reviews.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12808
    assert sum(r["label"] == "fresh" for r in rows) == 7403 and sum(r["label"] == "rotten" for r in rows) == 5405
    model = tmp_path / "all-MiniLM-L6-v2"
    assert (model / "config.json").is_file() and (model / "vocab.txt").is_file()


# ---------------------------------------------------------------------------------------------
# Helpers


def in_process_config(ws: Path, tmp_path: Path, *extra: str):
    from dtrain.config import load_config

    return load_config(None, tiny_args(ws, tmp_path / "out", *extra))


def load_tokenizer(ws: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ws / "model")


def tokenize(model_dir: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, truncation=True, max_length=32,
                                                         return_tensors="pt"))


def exported_logits(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenize(model_dir, texts)).logits.float()


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
