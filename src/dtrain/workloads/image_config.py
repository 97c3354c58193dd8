"""The image workload's config sections (torch-free: read before torch is imported).

Its builder is dtrain.workloads.image.build; dtrain.workloads registers the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dtrain.errors import ConfigError
from dtrain.sections import DataSection, ModelSection, opt


@dataclass
class ImageModelConfig(ModelSection):
    arch: str = opt("resnet18", "torchvision classification model name, e.g. resnet50, vit_b_16")
    weights: str = opt("", "local state_dict file to fine-tune from (head replaced when class counts differ)")
    dropout: float = opt(-1.0, "dropout for models that take one (negative = the model's default)")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")

    def describe(self) -> str:
        return f"model.arch={self.arch}"


@dataclass
class ImageDataConfig(DataSection):
    root: str = opt("data/mnist", "ImageFolder root with train/<class>/* and val/<class>/*")
    synthetic: bool = opt(False, "random images generated per index instead of files (benchmarks, tests)")
    synthetic_train_size: int = opt(1024, "synthetic: number of training images")
    synthetic_val_size: int = opt(256, "synthetic: number of validation images")
    num_classes: int = opt(10, "synthetic: number of classes (with files, taken from the folders)")
    image_size: int = opt(224, "validation center-crop size in pixels (and the training crop unless train_crop_size)")
    train_crop_size: int = opt(0, "training random-resized-crop size (0 = image_size); torchvision --train-crop-size")
    val_resize_size: int = opt(0, "validation: resize the short side to this before the center crop "
                                  "(0 = image_size / val_crop_ratio); torchvision --val-resize-size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = opt("bilinear", "resampling of every resize and crop")
    augment: bool = opt(True, "random resized crop (+ flip) for training; false = validation transform")
    min_crop_scale: float = opt(0.08, "smallest area fraction kept by the random resized crop")
    hflip: bool = opt(True, "random horizontal flip when augmenting")
    auto_augment: Literal["none", "ta_wide", "ra", "imagenet", "augmix"] = opt(
        "none", "policy after crop and flip: TrivialAugmentWide, RandAugment, AutoAugment's ImageNet policy, AugMix "
                "(torchvision --auto-augment)")
    random_erase: float = opt(0.0, "probability of erasing a random rectangle of a training image "
                                   "(torchvision --random-erase)")
    mixup_alpha: float = opt(0.0, "MixUp of each training batch with Beta(alpha, alpha) weights (0 = off); with "
                                  "cutmix_alpha one of the two is picked per batch")
    cutmix_alpha: float = opt(0.0, "CutMix of each training batch with Beta(alpha, alpha) areas (0 = off)")
    ra_reps: int = opt(1, "repeated augmentation: each image k times per epoch on consecutive ranks, epoch length "
                          "unchanged (1 = off); torchvision --ra-sampler --ra-reps")
    val_crop_ratio: float = opt(0.875, "validation: resize to image_size / ratio, then center crop")
    on_bad_image: Literal["stop", "skip"] = opt("stop", "an unreadable image: stop with its path, or skip it (one warning line per file)")
    decode: Literal["tensor", "pil", "gpu"] = opt(
        "tensor", "image files decoded to uint8 tensors (JPEG by torchvision.io) and transformed as tensors; as PIL "
                  "images (torchvision's reference); or gpu: workers read bytes and draw each sample's parameters, "
                  "the training process decodes (nvJPEG) and augments each batch on its device")

    def check(self) -> None:
        self.at_least(1, "image_size", "ra_reps")
        self.at_least(0, "train_crop_size", "val_resize_size")
        if 0 < self.val_resize_size < self.image_size:
            raise ConfigError(f"config key 'data.val_resize_size' ({self.val_resize_size}) must be >= "
                              f"data.image_size ({self.image_size}), the center crop taken from it")
        if self.auto_augment == "augmix" and self.decode == "gpu":
            raise ConfigError("data.decode=gpu applies ta_wide, ra and imagenet policies on the device, not augmix; "
                              "use data.decode=tensor for augmix")
        if self.auto_augment == "augmix" and self.interpolation == "bicubic":  # torchvision's AugMix works on tensors
            raise ConfigError("data.auto_augment=augmix takes data.interpolation=bilinear or nearest (AugMix "
                              "resamples tensors, which have no bicubic affine transform)")
        if not 0.0 <= self.random_erase <= 1.0:
            raise ConfigError(f"config key 'data.random_erase' is a probability (0 to 1), got {self.random_erase}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key 'data.{name}' must be >= 0 (0 = off), got {getattr(self, name)}")
