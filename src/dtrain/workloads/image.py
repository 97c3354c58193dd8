"""ImageNet-style classification: any torchvision model, ImageFolder data (or synthetic images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, default_collate
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder, default_loader

from dtrain.config import Config, ImageDataConfig, ImageModelConfig
from dtrain.errors import UserError
from dtrain.workloads import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build(cfg: Config, env) -> Task:
    data: ImageDataConfig = cfg.data
    if data.synthetic:
        train_set = SyntheticImages(data.synthetic_train_size, data.num_classes, data.image_size, seed=cfg.seed)
        val_set = SyntheticImages(data.synthetic_val_size, data.num_classes, data.image_size, seed=cfg.seed + 1)
        num_classes = data.num_classes
    else:
        train_set, val_set = image_folders(data)
        num_classes = len(train_set.classes)
    model = build_model(cfg.model, num_classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.model.label_smoothing)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    warned: set[str] = set()

    def good_part(batch):
        images, targets, bad = batch
        for path, reason in bad:
            if data.on_bad_image == "stop":
                raise UserError(f"cannot read image {path}: {reason} (fix or remove it, or set data.on_bad_image=skip)",
                                all_ranks=False)
            if path not in warned:
                warned.add(path)
                print(f"warning: skipping unreadable image {path}: {reason}", flush=True)
        if images.numel() == 0:
            raise UserError(f"every image in a batch was unreadable (first: {bad[0][0]}); check the data set",
                            all_ranks=False)
        return images.contiguous(memory_format=memory_format), targets

    def train_loss(model: nn.Module, batch) -> torch.Tensor:
        images, targets = good_part(batch)
        return criterion(model(images), targets)

    def eval_sums(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = good_part(batch)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        return {
            "samples": torch.tensor(float(targets.numel()), dtype=torch.float64),
            "loss_sum": F.cross_entropy(logits, targets, reduction="sum").double(),
            "correct1": hits[:, 0].sum().double(),
            "correct5": hits.any(dim=1).sum().double(),
        }

    return Task(
        model=model,
        train_set=train_set,
        val_set=val_set,
        train_loss=train_loss,
        eval_sums=eval_sums,
        summarize=summarize,
        collate_fn=collate_skipping_bad,
        random_samples=not data.synthetic,  # synthetic images are fixed by their index; folders are augmented
        identity={"workload": "image", "arch": cfg.model.arch, "num_classes": num_classes},
        units=blocks,
    )


def summarize(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums.get("samples", 0.0), 1.0)
    return {
        "loss": sums.get("loss_sum", 0.0) / n,
        "accuracy": sums.get("correct1", 0.0) / n,
        "top5": sums.get("correct5", 0.0) / n,
        "samples": int(sums.get("samples", 0)),
    }


# ---------------------------------------------------------------------------------------------
# Model


def build_model(model_cfg: ImageModelConfig, num_classes: int) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if model_cfg.arch not in known:
        import difflib

        close = difflib.get_close_matches(model_cfg.arch, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model.arch {model_cfg.arch!r}: not a torchvision classification model{hint} "
                        "(list: torchvision.models.list_models(module=torchvision.models))")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if model_cfg.dropout >= 0:
        kwargs["dropout"] = model_cfg.dropout
    try:
        model = torchvision.models.get_model(model_cfg.arch, **kwargs)
    except TypeError as e:
        if "dropout" in str(e):
            raise UserError(f"model.arch={model_cfg.arch} has no dropout setting; set model.dropout=-1") from None
        raise UserError(f"model.arch={model_cfg.arch} cannot be built: {e}") from None
    if model_cfg.weights:
        load_local_weights(model, model_cfg.weights)
    return model


def load_local_weights(model: nn.Module, path: str) -> None:
    """Fine-tune from a local state_dict; tensors whose shape differs (the classifier head) stay new."""
    if not Path(path).is_file():
        raise UserError(f"model.weights file {path!r} does not exist (nothing is downloaded; give a local file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UserError(f"model.weights file {path!r} is not a readable state_dict: {e}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    replaced = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(set(own) - set(kept) - set(replaced))
    if missing:
        raise UserError(f"model.weights {path!r} does not fit model: missing {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(kept, strict=False)
    if replaced:
        print(f"model.weights: new (randomly initialised) {', '.join(replaced)}: class count differs", flush=True)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a torchvision classifier: ResNet-style stages' blocks (layer1..layer4), a
    ViT's encoder layers, or the children of a `features` stack (VGG, MobileNet, EfficientNet, ...)."""
    stages = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if stages:
        return [block for stage in stages for block in stage]
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if layers is not None:
        return list(layers)
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [m for m in features if any(True for _ in m.parameters())]
    return []


# ---------------------------------------------------------------------------------------------
# Data


def image_folders(data: ImageDataConfig) -> tuple[Dataset, Dataset]:
    root = Path(data.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data.root {str(root)!r} has no {split}/ folder: expected "
                            f"{root}/train/<class>/*.png and {root}/val/<class>/*.png (make data for the demo)")
    train_set = _folder(root / "train", train_transform(data))
    val_set = _folder(root / "val", val_transform(data))
    if val_set.classes != train_set.classes:
        raise UserError(f"class folders differ between {root}/train ({len(train_set.classes)}) and {root}/val "
                        f"({len(val_set.classes)}): {sorted(set(train_set.classes) ^ set(val_set.classes))[:5]}")
    return train_set, val_set


def _folder(path: Path, transform) -> "SafeImageFolder":
    classes = [d.name for d in path.iterdir() if d.is_dir()]
    if not classes:
        raise UserError(f"{path} is empty: it needs one sub-folder of images per class")
    try:
        return SafeImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # a class folder without any image file
        raise UserError(f"{path}: {str(e).split('. Supported')[0]} (each class folder needs images with "
                        f"extensions {', '.join(IMG_EXTENSIONS[:4])}, ...)") from None


def train_transform(data: ImageDataConfig):
    if not data.augment:
        return val_transform(data)
    steps = [transforms.RandomResizedCrop(data.image_size, scale=(data.min_crop_scale, 1.0), antialias=True)]
    if data.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transform(data: ImageDataConfig):
    resize = int(round(data.image_size / data.val_crop_ratio))
    return transforms.Compose([
        transforms.Resize(resize, antialias=True),
        transforms.CenterCrop(data.image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class SafeImageFolder(ImageFolder):
    """ImageFolder whose unreadable files come back as (None, (path, reason)) instead of killing a worker.

    The main process then decides (data.on_bad_image) with the file name in hand, instead of a
    DataLoader-worker traceback.
    """

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.transform(default_loader(path))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            reason = type(e).__name__ if path in str(e) else f"{type(e).__name__}: {e}"
            return None, (path, reason)
        return image, target


def collate_skipping_bad(items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    good = [(x, y) for x, y in items if x is not None]
    bad = [y for x, y in items if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, targets = default_collate(good)
    return images, targets, bad


class SyntheticImages(Dataset):
    """Deterministic random images: item i is the same on every rank and every run (seeded by i)."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int):
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes
        image = torch.randn(3, self.image_size, self.image_size, generator=gen)
        image[label % 3] += 0.5 * (1 + label // 3)  # a weak class signal, so accuracy can move
        return image, label
