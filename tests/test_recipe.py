"""The image recipe's pieces on their own: config errors, transforms, the repeated-augmentation sampler,
seeded MixUp/CutMix, per-class metrics, parameter groups, and the presets."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dtrain.config import load_config
from dtrain.data import EpochSeeded, RepeatedAugmentationSampler, SeededBatchTransform, seeded
from dtrain.optim import build_optimizer, lr_factor, warmup_steps
from dtrain.workloads import image
from helpers import FAST, ROOT, Numbers, assert_one_clear_error, env_of, run_train


# ---------------------------------------------------------------------------------------------
# Every new key: a bad value is one error line and exit code 2, before torch is even imported.


@pytest.mark.parametrize("override, needles", [
    ("data.train_crop_size=-1", ["'data.train_crop_size' must be >= 0"]),
    ("data.val_resize_size=16", ["'data.val_resize_size' (16) must be >= data.image_size (32)"]),
    ("data.interpolation=lanczos", ["'data.interpolation' must be one of bilinear, bicubic, nearest"]),
    ("data.auto_augment=randaug", ["'data.auto_augment' must be one of none, ta_wide, ra, imagenet, augmix"]),
    ("data.auto_augment=augmix data.interpolation=bicubic", ["augmix takes data.interpolation=bilinear"]),
    ("data.random_erase=1.5", ["'data.random_erase' is a probability"]),
    ("data.mixup_alpha=-0.2", ["'data.mixup_alpha' must be >= 0"]),
    ("data.cutmix_alpha=much", ["'data.cutmix_alpha' must be float"]),
    ("data.ra_reps=0", ["'data.ra_reps' must be >= 1"]),
    ("ema.enabled=maybe", ["'ema.enabled' must be bool"]),
    ("ema.steps=0", ["'ema.steps' must be >= 1"]),
    ("ema.decay=1", ["'ema.decay' must be between 0 and 1"]),
    ("best_metric=ema_accuracy", ["best_metric=ema_accuracy needs the EMA", "ema.enabled=true"]),
    ("best_metric=loss", ["'best_metric' must be one of accuracy, ema_accuracy"]),
    ("sync_bn=sometimes", ["'sync_bn' must be bool"]),
    ("optim.backbone_lr_scale=0", ["'optim.backbone_lr_scale' must be > 0"]),
    ("optim.warmup_epochs=-1", ["'optim.warmup_epochs' must be >= 0"]),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.slow
def test_bad_values_of_the_recipe_keys_are_one_line_and_exit_2(tmp_path, override, needles):
    proc = run_train([*FAST, "data.synthetic=true", f"output_dir={tmp_path}", *override.split()], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc, *needles)


@pytest.mark.slow
@pytest.mark.parametrize("mode_args", [[], ["mode=dp"]], ids=["one process", "DataParallel"])
def test_sync_bn_is_refused_where_there_are_no_ranks_to_sync(tmp_path, mode_args):
    proc = run_train([*FAST, "model.arch=resnet18", "model.dropout=-1", "data.synthetic=true", "sync_bn=true",
                      f"output_dir={tmp_path}", *mode_args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc, "sync_bn=true")


# ---------------------------------------------------------------------------------------------
# Transforms


def recipe(**overrides) -> object:
    return load_config(None, ["data.image_size=32"] + [f"data.{k}={v}" for k, v in overrides.items()]).data


@pytest.mark.parametrize("policy", ["none", "ta_wide", "ra", "imagenet", "augmix"])
def test_training_crop_and_every_policy_give_normalised_tensors_of_the_training_size(policy):
    interpolation = "bilinear" if policy == "augmix" else "bicubic"  # AugMix has no bicubic (a config error)
    data = recipe(train_crop_size=24, auto_augment=policy, random_erase=1.0, interpolation=interpolation)
    picture = Image.new("RGB", (40, 30), (200, 30, 90))
    with seeded(0):
        sample = image.train_transform(data)(picture)
    out = image.collate_skipping_bad([(sample, 0)])[0][0]  # the tensor path normalises and erases per batch
    assert type(out) is torch.Tensor and out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert (out == 0).any()  # random erasing (p=1) left a rectangle of zeros (the mean after normalisation)


def test_validation_resizes_then_crops_the_image_size():
    transform = image.val_transform(recipe(val_resize_size=40))
    assert [type(t).__name__ for t in transform.transforms][:2] == ["Resize", "CenterCrop"]
    assert transform.transforms[0].size == [40] and transform.transforms[1].size == (32, 32)
    assert image.val_transform(recipe()).transforms[0].size == [round(32 / 0.875)]  # from val_crop_ratio
    assert image.val_transform(recipe()).transforms[0].size == [37]
    assert image.val_transform(recipe())(Image.new("RGB", (50, 60))).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Repeated augmentation


def ra_keys(n: int, world_size: int, reps: int, epoch: int = 0, skip: int = 0) -> list[list[tuple]]:
    samplers = [RepeatedAugmentationSampler(Numbers(n), env_of(r, world_size), seed=5, repeats=reps)
                for r in range(world_size)]
    for s in samplers:
        s.start_epoch(epoch, skip=skip)
    return [list(s) for s in samplers]


def test_repeated_augmentation_shows_each_image_k_times_on_different_ranks_in_an_epoch_of_unchanged_length():
    per_rank = ra_keys(n=22, world_size=4, reps=3)
    assert [len(k) for k in per_rank] == [22 // 4] * 4  # len(dataset) // world size per rank
    everything = [key for keys in per_rank for key in keys]
    assert len(set(everything)) == len(everything)  # each (epoch, index, repeat) at most once: own augmentation
    by_index: dict[int, set[int]] = {}
    for rank, keys in enumerate(per_rank):
        for _, index, _ in keys:
            by_index.setdefault(index, set()).add(rank)
    complete = [ranks for ranks in by_index.values() if len(ranks) == 3]
    assert len(complete) >= 5, by_index  # 20 samples / 3 repeats: 6 images whole, the 7th cut by the epoch end
    assert all(len(ranks) <= 3 for ranks in by_index.values())  # k copies on k different ranks
    assert ra_keys(n=22, world_size=4, reps=3, epoch=1) != per_rank  # a new permutation per epoch
    assert ra_keys(n=22, world_size=4, reps=3) == per_rank  # and the same one when asked again


@pytest.mark.parametrize("new_world_size", [1, 2, 4])
def test_repeated_augmentation_resumes_mid_epoch_on_any_world_size(new_world_size):
    """After 8 samples of 2 ranks, the rest of the epoch is the same sequence, dealt to the new ranks."""
    full = ra_keys(n=24, world_size=2, reps=4)
    consumed = {key for keys in full for key in keys[:4]}
    rest = ra_keys(n=24, world_size=new_world_size, reps=4, skip=8 // new_world_size)
    one = ra_keys(n=24, world_size=1, reps=4)[0]
    assert consumed == set(one[:8])  # what 2 ranks consumed is the prefix of the one sequence
    assert sorted(key for keys in rest for key in keys) == sorted(one[8:24 // new_world_size * new_world_size])


def test_each_repeat_of_a_sample_gets_its_own_augmentation():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(1).item()

    samples = EpochSeeded(Noise(), seed=0)
    draws = [samples[(0, 1, r)] for r in range(3)]
    assert len(set(draws)) == 3 and samples[(0, 1, 2)] == draws[2]


# ---------------------------------------------------------------------------------------------
# MixUp / CutMix


def test_mixup_cutmix_draws_depend_only_on_the_batch_keys_and_leave_the_caller_rng_alone():
    data = recipe(mixup_alpha=0.2, cutmix_alpha=1.0)
    mix = SeededBatchTransform(image.collate_skipping_bad, image.mixup_cutmix(data, num_classes=3), seed=0)

    def batch(keys):
        from dtrain.data import KeyedItems

        items = [(torch.full((3, 8, 8), float(k[1])), k[1] % 3) for k in keys]
        return KeyedItems(items, keys)

    keys = [(0, i) for i in range(4)]
    before = torch.get_rng_state()
    first = mix(batch(keys))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # the caller's generator moves on: the batch's draw must not
    again = mix(batch(keys))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    images, targets, bad = first
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(dim=1), torch.ones(4)) and bad == []
    assert (targets.max(dim=1).values < 1).any()  # soft targets: some sample is a mixture
    draws = {tuple(mix(batch([(e, i) for i in range(4)]))[1].flatten().tolist()) for e in range(6)}
    assert len(draws) > 1  # other batches, other draws


# ---------------------------------------------------------------------------------------------
# Per-class metrics


def test_per_class_precision_recall_f1_and_macro_averages_from_the_confusion_counts():
    # rows: true class, columns: predicted. Class 3 never appears nor is predicted; class 2 is never predicted.
    matrix = torch.tensor([[5, 1, 0, 0], [2, 3, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    metrics = image.summarize({"samples": 13.0, "loss_sum": 6.5, "correct1": 8.0, "correct5": 13.0,
                               "confusion": matrix}, num_classes=4)
    precision = [5 / 8, 3 / 5, 0.0, 0.0]  # class 2: predicted never, precision 0 (scikit-learn zero_division=0)
    recall = [5 / 6, 3 / 5, 0.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    assert metrics["per_class"]["precision"] == [round(v, 4) for v in precision]
    assert metrics["per_class"]["recall"] == [round(v, 4) for v in recall]
    assert metrics["per_class"]["f1"] == pytest.approx(f1, abs=1e-4)
    assert metrics["per_class"]["support"] == [6, 5, 2, 0]
    # class 3 is left out of the macro averages (neither present nor predicted)
    assert metrics["macro_precision"] == pytest.approx(sum(precision[:3]) / 3)
    assert metrics["macro_recall"] == pytest.approx(sum(recall[:3]) / 3)
    assert metrics["macro_f1"] == pytest.approx(sum(f1[:3]) / 3)
    assert metrics["accuracy"] == pytest.approx(8 / 13) and metrics["samples"] == 13


# ---------------------------------------------------------------------------------------------
# Fine-tuning: the head keeps the learning rate, the backbone gets lr x backbone_lr_scale


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("squeezenet1_1", "classifier.1"),
                                        ("mobilenet_v3_small", "classifier.3")])
def test_backbone_lr_scale_applies_to_everything_but_the_head(arch, head):
    from torchvision.models import get_model

    model = get_model(arch, weights=None, num_classes=7)
    assert image.head_name(model, 7) == head
    cfg = load_config(None, ["optim.lr=0.1", "optim.backbone_lr_scale=0.1"]).optim
    optimizer = build_optimizer(model, cfg, is_head=lambda name: name.startswith(f"{head}."))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.1 if name.startswith(f"{head}.") else 0.01), name
    plain = build_optimizer(model, load_config(None, []).optim)
    assert len(plain.param_groups) == 2  # without the scale: the (decay, no decay) layout of older checkpoints


def test_warmup_in_epochs_follows_the_epoch_length():
    cfg = load_config(None, ["optim.warmup_epochs=2", "optim.schedule=constant"]).optim
    assert warmup_steps(cfg, steps_per_epoch=10) == 20
    assert [lr_factor(s, cfg, 100, 10) for s in (0, 9, 19, 20)] == [0.05, 0.5, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("preset, top1", [("resnet50_v1", "76.130"), ("resnet50_v2", "80.858")])
def test_presets_state_the_published_accuracy_and_the_command_they_mirror(preset, top1):
    text = (ROOT / "configs" / "image" / f"{preset}.yaml").read_text()
    assert f"top-1 {top1}" in text and "torchrun --nproc_per_node=8 train.py --model resnet50" in text
    assert "Global batch assumed" in text and "optim.lr =" in text
    cfg = load_config(str(ROOT / "configs" / "image" / f"{preset}.yaml"), [])
    assert cfg.model.arch == "resnet50" and not math.isnan(cfg.optim.lr)
