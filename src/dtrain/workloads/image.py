"""ImageNet-style classification: any torchvision model, ImageFolder data (or synthetic images).

The training recipe's pieces are torchvision's own: transforms.v2 for the per-sample augmentation
(random resized crop, flip, an auto-augment policy, random erasing) and MixUp/CutMix for whole batches
(soft targets, which the cross-entropy loss takes as class probabilities). Evaluation reports top-1/top-5
and exact per-class precision, recall and F1 from a confusion matrix summed over the ranks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder, default_loader
from torchvision.transforms import InterpolationMode, v2

from dtrain.config import Config
from dtrain.errors import UserError
from dtrain.workloads.image_config import ImageDataConfig, ImageModelConfig
from dtrain.workloads.task import LoaderOptions, Task
from dtrain.workloads.image_device import (DeviceImages, EncodedBatch, Mix, PlanDrawer, Planned, keep_for_validation,
                                           mix_labels, placeholder, read_encoded)
from dtrain.workloads.image_io import read_rgb_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


ImageRunConfig = Config[ImageModelConfig, ImageDataConfig]


def build(cfg: ImageRunConfig, env) -> Task:
    data = cfg.data
    if data.synthetic:
        # Generated as the transforms would hand them over (training crop / validation crop size); no
        # per-sample augmentation is applied to them.
        train_set = SyntheticImages(data.synthetic_train_size, data.num_classes, train_crop_size(data),
                                    seed=cfg.seed)
        val_set = SyntheticImages(data.synthetic_val_size, data.num_classes, data.image_size, seed=cfg.seed + 1)
        classes = [str(i) for i in range(data.num_classes)]
    else:
        train_set, val_set = image_folders(data)
        classes = train_set.classes
    num_classes = len(classes)
    model = build_model(cfg.model, num_classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.model.label_smoothing)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    warned: set[str] = set()
    on_device = device_images(data, env, num_classes) if data.decode == "gpu" and not data.synthetic else None

    def good_part(batch):
        images, targets, bad = batch
        if isinstance(images, EncodedBatch):
            images, targets, bad = on_device(images, targets, bad)
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
        return criterion(model(images), targets)  # targets: class ids, or class probabilities after MixUp/CutMix

    def eval_sums(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = good_part(batch)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        # Counts (true class, predicted class): sums over batches and ranks stay exact integers.
        confusion = torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
        return {
            "samples": torch.tensor(float(targets.numel()), dtype=torch.float64),
            "loss_sum": F.cross_entropy(logits, targets, reduction="sum").double(),
            "correct1": hits[:, 0].sum().double(),
            "correct5": hits.any(dim=1).sum().double(),
            "confusion": confusion.view(num_classes, num_classes).double(),
        }

    def confusion(sums: dict[str, Any]) -> tuple[list[str], list[list[int]]]:
        return classes, confusion_matrix(sums, num_classes).long().tolist()

    head = head_name(model, num_classes)
    return Task(
        model=model,
        train_set=train_set,
        val_set=val_set,
        train_loss=train_loss,
        eval_sums=eval_sums,
        summarize=functools.partial(summarize, num_classes=num_classes),
        collate_fn=collate_skipping_bad,
        random_samples=not data.synthetic,  # synthetic images are fixed by their index; folders are augmented
        identity={"workload": "image", "arch": cfg.model.arch, "num_classes": num_classes},
        units=blocks,
        is_head=lambda name: name.startswith(f"{head}."),
        loading=LoaderOptions(batch_transform=mixup_cutmix(data, num_classes), ra_reps=data.ra_reps),
        confusion=confusion,
    )


def device_images(data: ImageDataConfig, env, num_classes: int):
    """data.decode=gpu's training-process step: (EncodedBatch, targets, unreadable) -> the float batch on the
    run's device, its targets (soft after MixUp/CutMix), and the unreadable files with those the device found."""
    if env.device.type != "cuda" and env.is_main:
        print("data.decode=gpu: no GPU in this run; the training process decodes and augments each batch on the "
              "CPU (the same code; data.decode=tensor spreads that work over the loader workers)", flush=True)
    policy = train_policy(data) if data.augment and data.auto_augment != "none" else None
    transform = DeviceImages(data, train_crop_size(data), env.device, policy, IMAGENET_MEAN, IMAGENET_STD)
    told = []

    def materialize(batch: EncodedBatch, targets: torch.Tensor, bad: list):
        if not told and any(shape is not None for _, _, shape in batch.spans) and env.is_main:
            told.append(True)
            first = next(path for path, (_, _, shape) in zip(batch.paths, batch.spans) if shape is not None)
            print(f"data.decode=gpu: {first} is not a JPEG (or is a CMYK one); files like it are decoded by the "
                  "loader workers on the CPU, their other steps run on the device", flush=True)
        images, kept, unreadable = transform(batch)
        if len(kept) < len(batch):
            targets = targets[torch.tensor(kept, device=targets.device, dtype=torch.long)]
        if batch.mix is not None and images.numel() > 0:
            images, targets = apply_mix(images, targets, batch.mix, num_classes)
        return images, targets, [*bad, *unreadable]

    return materialize


def summarize(sums: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Accuracy, top-5, and per-class precision, recall and F1 with their macro averages.

    A class that is neither in the validation set nor ever predicted is left out of the macro averages
    (it has no precision or recall to speak of); one never predicted has precision 0 (as scikit-learn's
    zero_division=0).
    """
    n = max(sums.get("samples", 0.0), 1.0)
    matrix = confusion_matrix(sums, num_classes)
    hits, predicted, support = matrix.diagonal(), matrix.sum(dim=0), matrix.sum(dim=1)
    precision = hits / predicted.clamp(min=1)
    recall = hits / support.clamp(min=1)
    f1 = 2 * hits / (predicted + support).clamp(min=1)
    seen = (predicted + support) > 0
    macro = {name: (values[seen].mean().item() if seen.any() else 0.0)
             for name, values in (("macro_precision", precision), ("macro_recall", recall), ("macro_f1", f1))}
    return {
        "loss": sums.get("loss_sum", 0.0) / n,
        "accuracy": sums.get("correct1", 0.0) / n,
        "top5": sums.get("correct5", 0.0) / n,
        **macro,
        "samples": int(sums.get("samples", 0)),
        "per_class": {"precision": rounded(precision), "recall": rounded(recall), "f1": rounded(f1),
                      "support": support.long().tolist()},
    }


def confusion_matrix(sums: dict[str, Any], num_classes: int) -> torch.Tensor:
    """The reduced confusion counts (absent when no rank evaluated a batch)."""
    matrix = sums.get("confusion")
    return matrix.double() if matrix is not None else torch.zeros(num_classes, num_classes, dtype=torch.float64)


def rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in values.tolist()]  # metrics.jsonl stays short for a thousand classes


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


def head_name(model: nn.Module, num_classes: int) -> str:
    """The classifier head: the last module that maps to the class scores (resnet `fc`, vit `heads.head`,
    `classifier.N` of VGG, MobileNet, EfficientNet, SqueezeNet's 1x1 convolution)."""
    heads = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and m.weight.shape[0] == num_classes]
    return heads[-1] if heads else ""


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
    loader = {"tensor": read_rgb_tensor, "pil": default_loader, "gpu": read_encoded}[data.decode]
    if data.decode == "gpu":  # the workers draw each sample's parameters; the device applies them
        train, val = (PlanDrawer(data, train_crop_size(data), ErasedLater(data.random_erase).draw_erasing)
                      if data.augment else keep_for_validation), keep_for_validation
    else:
        train, val = train_transform(data), val_transform(data)
    train_set = _folder(root / "train", train, loader)
    val_set = _folder(root / "val", val, loader)
    if val_set.classes != train_set.classes:
        raise UserError(f"class folders differ between {root}/train ({len(train_set.classes)}) and {root}/val "
                        f"({len(val_set.classes)}): {sorted(set(train_set.classes) ^ set(val_set.classes))[:5]}")
    return train_set, val_set


def _folder(path: Path, transform, loader=default_loader) -> "SafeImageFolder":
    classes = [d.name for d in path.iterdir() if d.is_dir()]
    if not classes:
        raise UserError(f"{path} is empty: it needs one sub-folder of images per class")
    try:
        return SafeImageFolder(str(path), transform=transform, loader=loader)
    except FileNotFoundError as e:  # a class folder without any image file
        raise UserError(f"{path}: {str(e).split('. Supported')[0]} (each class folder needs images with "
                        f"extensions {', '.join(IMG_EXTENSIONS[:4])}, ...)") from None


def train_crop_size(data: ImageDataConfig) -> int:
    return data.train_crop_size or data.image_size


def train_transform(data: ImageDataConfig) -> v2.Compose:
    """torchvision's training preset: random resized crop, flip, auto-augment policy (on the image, before
    it becomes a float tensor), normalisation, random erasing. Random draws come from torch's generator,
    which the loader seeds per sample (data.EpochSeeded); a PIL image and a uint8 tensor of the same pixels
    draw the same crop box, flip and policy operation, so data.decode does not change what is drawn."""
    if not data.augment:
        return val_transform(data)
    interpolation = InterpolationMode(data.interpolation)
    steps: list[Any] = [v2.RandomResizedCrop(
        train_crop_size(data), scale=(data.min_crop_scale, 1.0), interpolation=interpolation, antialias=True)]
    if data.decode == "tensor" and data.auto_augment != "none":
        # torchvision's auto-augment kernels on a crop-sized uint8 tensor take about 3x their PIL kernels'
        # time (most go through float and grid_sample), and a PIL view of the crop costs one small copy.
        steps.append(as_pil)
    if data.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if data.auto_augment != "none":
        steps.append(train_policy(data))
    if data.decode == "tensor":
        # uint8 to the batch: collate_skipping_bad converts and normalises the whole batch at once, then erases.
        steps.append(ErasedLater(data.random_erase))
        return v2.Compose(steps)
    steps += to_normalized_tensor(data)
    if data.random_erase > 0:
        steps.append(v2.RandomErasing(p=data.random_erase))
    return v2.Compose(steps)


def train_policy(data: ImageDataConfig):
    interpolation = InterpolationMode(data.interpolation)
    return {
        "ta_wide": lambda: v2.TrivialAugmentWide(interpolation=interpolation),
        "ra": lambda: v2.RandAugment(interpolation=interpolation),
        "imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation),
        "augmix": lambda: v2.AugMix(interpolation=interpolation),
    }[data.auto_augment]()


def val_transform(data: ImageDataConfig) -> v2.Compose:
    resize = data.val_resize_size or int(round(data.image_size / data.val_crop_ratio))
    return v2.Compose([v2.Resize(resize, interpolation=InterpolationMode(data.interpolation), antialias=True),
                       v2.CenterCrop(data.image_size), *to_normalized_tensor(data)])


def to_normalized_tensor(data: ImageDataConfig) -> list[Any]:
    """Float and normalised last, on the crop: the cheapest place (the crop is smaller than the file)."""
    if data.decode == "pil":
        return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                v2.ToPureTensor()]
    return [NormalizedFloat()]


def as_pil(image):
    """A 3 x H x W uint8 tensor as a PIL image: PIL merges the three planes (v2.ToPILImage, and torch's
    transposing copy of a uint8 tensor, take several times longer)."""
    if isinstance(image, Image.Image):
        return image
    planes = image.as_subclass(torch.Tensor).contiguous().numpy()
    height, width = planes.shape[1:]
    return Image.merge("RGB", [Image.frombuffer("L", (width, height), plane, "raw", "L", 0, 1) for plane in planes])


def planes(image: Image.Image) -> torch.Tensor:
    """A PIL image as a contiguous 3 x H x W uint8 tensor: PIL splits its pixels into planes, so the conversion
    to float later reads contiguous bytes (from interleaved H x W x 3 pixels torch's uint8-to-float copy took
    about 3x as long here)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.stack([np.asarray(band) for band in rgb.split()]))


class NormalizedFloat:
    """uint8 image (tensor or PIL) -> float32 3 x H x W tensor (x - 255 mean) / (255 std): v2.PILToTensor,
    v2.ToDtype(scale=True) and v2.Normalize in one allocation and one pass more (equal to them within float32
    rounding)."""

    def __init__(self):
        self.shift = torch.tensor(IMAGENET_MEAN).mul(255).view(3, 1, 1)
        self.scale = torch.tensor(IMAGENET_STD).mul(255).reciprocal().view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        pixels = image.as_subclass(torch.Tensor)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return out.copy_(pixels).sub_(self.shift).mul_(self.scale)


class Uint8Crop:
    """A training crop still in uint8 (3 x H x W, possibly a view of H x W x 3 pixels) and the rectangle random
    erasing drew for it (top, left, height, width), or None. collate_skipping_bad writes the float batch
    directly (normalised, erased): no per-sample float tensor is made and copied again to collate it."""

    __slots__ = ("pixels", "erase")

    def __init__(self, pixels: torch.Tensor, erase: tuple[int, int, int, int] | None):
        self.pixels, self.erase = pixels, erase


class ErasedLater:
    """The last per-sample step of the tensor path: the crop as a Uint8Crop, with v2.RandomErasing(p)'s draws
    made here, from the sample's own seed, in the same order and with the same calls as v2.RandomErasing
    makes them (the rectangle is filled with 0, the value it writes after normalisation, once the batch is
    normalised)."""

    def __init__(self, p: float):
        self.eraser = v2.RandomErasing(p=p) if p > 0 else None

    def __call__(self, image) -> Uint8Crop:
        if isinstance(image, Image.Image):
            pixels = planes(image)
        else:
            pixels = image.as_subclass(torch.Tensor)
        return Uint8Crop(pixels, self.draw_erasing(pixels))

    def draw_erasing(self, pixels: torch.Tensor) -> tuple[int, int, int, int] | None:
        if self.eraser is None or torch.rand(1) >= self.eraser.p:
            return None
        params = self.eraser.make_params([pixels])
        return None if params["v"] is None else (params["i"], params["j"], params["h"], params["w"])


NORMALIZE_SHIFT = torch.tensor(IMAGENET_MEAN).mul(255).view(3, 1, 1)
NORMALIZE_SCALE = torch.tensor(IMAGENET_STD).mul(255).reciprocal().view(3, 1, 1)


def normalized_batch(crops: list[Uint8Crop]) -> torch.Tensor:
    """The crops as one float32 N x 3 x H x W batch, (x - 255 mean) / (255 std), erased rectangles 0: what
    NormalizedFloat and v2.RandomErasing give per sample, within float32 rounding (the erased pixels exactly).
    Each crop is converted and normalised while its pixels are in cache."""
    out = torch.empty((len(crops), *crops[0].pixels.shape), dtype=torch.float32)
    for k, crop in enumerate(crops):
        sample = out[k].copy_(crop.pixels).sub_(NORMALIZE_SHIFT).mul_(NORMALIZE_SCALE)
        if crop.erase is not None:
            top, left, height, width = crop.erase
            sample[:, top:top + height, left:left + width] = 0
    return out


def mixup_cutmix(data: ImageDataConfig, num_classes: int):
    """MixUp and/or CutMix of a collated (images, targets, unreadable) batch; one of them, chosen at random
    per batch, when both are on (as torchvision's reference does). None when both are off."""
    choices = [v2.MixUp(alpha=data.mixup_alpha, num_classes=num_classes)] if data.mixup_alpha > 0 else []
    if data.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=data.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None

    def transform(batch):
        images, targets, bad = batch
        if isinstance(images, EncodedBatch):  # data.decode=gpu: drawn here, applied on the device
            size = train_crop_size(data)
            images.mix = draw_mix(choices, placeholder(len(images), 3, size, size))
            return batch
        if images.numel() == 0:
            return batch  # every image unreadable: good_part reports it
        return *mix_in_place(choices, images, targets, num_classes), bad

    return transform


def mix_in_place(choices: list, images: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """v2.RandomChoice(choices)(images, targets), drawing the same numbers (the choice, then the chosen
    transform's own make_params), but mixing the collated batch in place: torchvision's MixUp makes two
    batch-sized copies and CutMix a clone of the batch, a tenth of the loader's time at the v2 recipe's
    crop. CutMix gives the same pixels as torchvision's; MixUp the same within float32 rounding."""
    return apply_mix(images, targets, draw_mix(choices, images), num_classes)


def draw_mix(choices: list, images: torch.Tensor) -> Mix:
    """v2.RandomChoice(choices)'s draws for a batch shaped like `images`: the choice, then its make_params."""
    chosen = choices[int(torch.multinomial(torch.tensor([1 / len(choices)] * len(choices)), 1))]
    params = chosen.make_params([images])
    if isinstance(chosen, v2.CutMix):
        return Mix(params["lam_adjusted"], tuple(int(v) for v in params["box"]))
    return Mix(float(params["lam"]))


def apply_mix(images: torch.Tensor, targets: torch.Tensor, mix: Mix, num_classes: int):
    if mix.box is not None:
        x1, y1, x2, y2 = mix.box
        images[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].roll(1, 0)
    else:
        mix_with_previous(images, 1.0 - mix.lam)
    return images, mix_labels(targets, num_classes, mix.lam)


def mix_with_previous(images: torch.Tensor, weight: float) -> None:
    """images.lerp_(images.roll(1, 0), weight) without the batch-sized copy that roll makes: sample k takes
    sample k - 1 (the first, the last), walking backwards so that every sample is mixed with the original of its
    neighbour; only the last sample is copied."""
    last = images[-1].clone()
    for k in range(images.shape[0] - 1, 0, -1):
        images[k].lerp_(images[k - 1], weight)
    images[0].lerp_(last, weight)


class SafeImageFolder(ImageFolder):
    """ImageFolder whose unreadable files come back as (None, (path, reason)) instead of killing a worker.

    The main process then decides (data.on_bad_image) with the file name in hand, instead of a
    DataLoader-worker traceback.
    """

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.transform(self.loader(path))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            reason = type(e).__name__ if path in str(e) else f"{type(e).__name__}: {e}"
            return None, (path, reason)
        return image, target


def collate_skipping_bad(items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    good = [(x, y) for x, y in items if x is not None]
    bad = [y for x, y in items if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    if isinstance(good[0][0], Planned):
        return EncodedBatch.of([x for x, _ in good]), torch.tensor([y for _, y in good]), bad
    if isinstance(good[0][0], Uint8Crop):
        return normalized_batch([x for x, _ in good]), torch.tensor([y for _, y in good]), bad
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
