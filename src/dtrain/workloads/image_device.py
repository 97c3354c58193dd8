"""data.decode=gpu: the loader workers read file bytes and draw each sample's random parameters; the training
process decodes a whole batch on its device (nvJPEG on a GPU) and crops, flips, augments, normalises, erases and
mixes it there.

What a sample gets is drawn exactly as on the CPU paths: each sample's transforms run under its own seed
(data.EpochSeeded), here on a placeholder of the image's size with torchvision's own transforms recording
their parameters instead of applying them (Drawn* below), so a sample gets the same crop box, flip, policy
operation and erased rectangle on every path; a batch's MixUp/CutMix draws come from its batch seed as
there. The device then applies torchvision's own kernels with those parameters. On a CPU device the same code
runs on the CPU (the tests' case).

A file that is not a JPEG, or a JPEG whose colour space nvJPEG does not take (CMYK), is decoded by its worker
as data.decode=tensor decodes it (image_io.read_rgb_tensor) and travels as pixels; a JPEG that fails to decode
on the device is decoded by PIL in the training process, as the tensor path does, and is reported like any
unreadable file when PIL cannot read it either.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import _get_inverse_affine_matrix  # the matrix F.affine and F.rotate use
from torchvision.transforms.v2 import functional as TF

from dtrain.workloads.image_config import ImageDataConfig
from dtrain.workloads.image_io import JPEG_START, read_rgb_tensor, read_with_pil

DEVICE_DECODED_MODES = ("RGB", "L")  # JPEG colour spaces decoded on the device; others by the worker


@dataclass
class Encoded:
    """One file as read by a worker: JPEG bytes (1-D uint8) to decode on the device, or the 3 x H x W uint8
    pixels of a file the worker decoded itself."""

    data: torch.Tensor
    height: int
    width: int
    path: str

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


def read_encoded(path: str) -> Encoded:
    """The file at `path` for data.decode=gpu; raises OSError or ValueError as PIL does for an unreadable file
    that could not be handed to the device (not a JPEG)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == JPEG_START:
        try:
            with Image.open(io.BytesIO(raw)) as header:  # reads the markers only: size and colour space
                width, height, mode = *header.size, header.mode
        except (OSError, ValueError):
            mode = ""
        if mode in DEVICE_DECODED_MODES:
            return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), height, width, path)
    pixels = read_rgb_tensor(path)
    return Encoded(pixels, pixels.shape[1], pixels.shape[2], path)


# ---------------------------------------------------------------------------------------------
# Worker side: draw each sample's parameters


@dataclass
class Plan:
    """A training sample's drawn parameters; crop None is the validation geometry (resize, center crop)."""

    crop: tuple[int, int, int, int] | None = None  # top, left, height, width in the decoded image
    flip: bool = False
    ops: list[tuple[str, float]] = field(default_factory=list)  # policy operations and magnitudes, in order
    erase: tuple[int, int, int, int] | None = None  # top, left, height, width in the crop


@dataclass
class Planned:
    encoded: Encoded
    plan: Plan


def placeholder(*shape: int) -> torch.Tensor:
    """A uint8 tensor of `shape` without memory behind it: what torchvision reads sizes from."""
    return torch.zeros((), dtype=torch.uint8).expand(*shape)


class DrawnResizedCrop(v2.RandomResizedCrop):
    def transform(self, inpt, params):
        self.plan.crop = (params["top"], params["left"], params["height"], params["width"])
        return placeholder(3, *self.size)


class DrawnFlip(v2.RandomHorizontalFlip):
    def transform(self, inpt, params):
        self.plan.flip = True
        return inpt


class RecordsOps:
    """Mixed into a torchvision auto-augment policy: its forward draws as always; the chosen operations and
    magnitudes are recorded instead of applied."""

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        self.plan.ops.append((transform_id, magnitude))
        return image


class DrawnTrivialAugmentWide(RecordsOps, v2.TrivialAugmentWide):
    pass


class DrawnRandAugment(RecordsOps, v2.RandAugment):
    pass


class DrawnAutoAugment(RecordsOps, v2.AutoAugment):
    pass


class PlanDrawer:
    """The training transform of data.decode=gpu: runs in the worker under the sample's seed and returns its
    Plan. Its steps draw in the order train_transform's do (crop, flip, policy, erasing)."""

    def __init__(self, data: ImageDataConfig, crop_size: int, draw_erasing):
        """draw_erasing(crop) -> rectangle or None: the tensor path's own draw (image.ErasedLater)."""
        self.crop_size, self.draw_erasing = crop_size, draw_erasing
        self.steps = [DrawnResizedCrop(crop_size, scale=(data.min_crop_scale, 1.0))]
        if data.hflip:
            self.steps.append(DrawnFlip())
        if data.auto_augment != "none":
            self.steps.append(DRAWN_POLICIES[data.auto_augment]())

    def __call__(self, encoded: Encoded) -> Planned:
        plan = Plan()
        image = placeholder(3, encoded.height, encoded.width)
        for step in self.steps:
            step.plan = plan
            image = step(image)
        plan.erase = self.draw_erasing(placeholder(3, self.crop_size, self.crop_size))
        return Planned(encoded, plan)


def keep_for_validation(encoded: Encoded) -> Planned:
    return Planned(encoded, Plan())


# The policies data.decode=gpu applies (AugMix mixes chains of operations with weights of its own: not recorded).
DRAWN_POLICIES = {"ta_wide": DrawnTrivialAugmentWide, "ra": DrawnRandAugment, "imagenet": DrawnAutoAugment}


# ---------------------------------------------------------------------------------------------
# Collation: one buffer per batch


@dataclass
class Mix:
    """A batch's MixUp (box None) or CutMix draw."""

    lam: float
    box: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2


@dataclass
class EncodedBatch:
    """A batch as the workers hand it over: every sample's bytes or pixels in one buffer (one shared-memory
    block per batch, not one per sample), their Plans, and the batch's MixUp/CutMix draw."""

    buffer: torch.Tensor
    spans: list[tuple[int, int, tuple[int, ...] | None]]  # offset, length, pixels' shape (None: JPEG bytes)
    plans: list[Plan]
    paths: list[str]
    mix: Mix | None = None

    @classmethod
    def of(cls, samples: list[Planned]) -> "EncodedBatch":
        spans, offset = [], 0
        for s in samples:
            length = s.encoded.data.numel()
            spans.append((offset, length, None if s.encoded.is_jpeg else tuple(s.encoded.data.shape)))
            offset += length
        buffer = torch.empty(offset, dtype=torch.uint8)
        for s, (start, length, _) in zip(samples, spans):
            buffer[start:start + length] = s.encoded.data.reshape(-1)
        return cls(buffer, spans, [s.plan for s in samples], [s.encoded.path for s in samples])

    def __len__(self) -> int:
        return len(self.spans)

    def data(self, k: int) -> torch.Tensor:
        start, length, shape = self.spans[k]
        part = self.buffer[start:start + length]
        return part if shape is None else part.view(shape)


# ---------------------------------------------------------------------------------------------
# Training-process side: decode and transform on the device


class DeviceImages:
    """Turns an EncodedBatch into a normalised float batch on `device`, with the samples' drawn parameters."""

    def __init__(self, data: ImageDataConfig, train_crop: int, device: torch.device, policy, mean, std):
        """policy: the torchvision auto-augment transform whose kernels apply the drawn operations (None: none);
        mean, std: the normalisation, per channel in [0, 1] units."""
        self.data, self.train_crop, self.device, self.policy = data, train_crop, device, policy
        self.interpolation = InterpolationMode(data.interpolation)
        self.val_resize = data.val_resize_size or int(round(data.image_size / data.val_crop_ratio))
        self.shift = torch.tensor(mean, device=device).mul(255).view(1, 3, 1, 1)
        self.scale = torch.tensor(std, device=device).mul(255).reciprocal().view(1, 3, 1, 1)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """(images, indices of the samples in them, (path, reason) of those that could not be decoded)."""
        with torch.autocast(self.device.type, enabled=False):
            decoded, bad = self.decode(batch)
            kept = [k for k in range(len(batch)) if k in decoded]
            if not kept:
                return torch.empty(0, device=self.device), kept, bad
            plans = [batch.plans[k] for k in kept]
            crops = torch.stack([self.crop(decoded[k], plan) for k, plan in zip(kept, plans)])
            flipped = [row for row, plan in enumerate(plans) if plan.flip]
            if flipped:
                crops[flipped] = crops[flipped].flip(-1)
            if self.policy is not None:
                crops = self.apply_operations(crops, [plan.ops for plan in plans])
            images = crops.float().sub_(self.shift).mul_(self.scale)
            for row, k in enumerate(kept):
                if batch.plans[k].erase is not None:
                    top, left, height, width = batch.plans[k].erase
                    images[row, :, top:top + height, left:left + width] = 0
            return images, kept, bad

    def decode(self, batch: EncodedBatch) -> tuple[dict[int, torch.Tensor], list[tuple[str, str]]]:
        images = {k: batch.data(k).to(self.device, non_blocking=True)
                  for k, (_, _, shape) in enumerate(batch.spans) if shape is not None}
        jpegs = [k for k, (_, _, shape) in enumerate(batch.spans) if shape is None]
        bad = []
        try:
            images.update(zip(jpegs, self.decode_jpegs([batch.data(k) for k in jpegs])))
        except RuntimeError:  # one file spoils a batched decode: decode one by one to find it
            for k in jpegs:
                try:
                    images[k] = self.decode_jpegs([batch.data(k)])[0]
                except RuntimeError:
                    try:
                        images[k] = self.read_with_pil(batch.data(k)).to(self.device)
                    except (OSError, ValueError) as e:
                        bad.append((batch.paths[k], f"{type(e).__name__}: {e}"))
        return images, bad

    def decode_jpegs(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        if not encoded:
            return []
        if self.device.type == "cuda":
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)

    @staticmethod
    def read_with_pil(data: torch.Tensor) -> torch.Tensor:
        """What the tensor path does with a JPEG decode_jpeg refuses: PIL reads it, or says why it cannot."""
        return read_with_pil(io.BytesIO(data.numpy().tobytes()))

    def crop(self, image: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The sample's crop (training: its random resized crop; validation: resize, center crop)."""
        if plan.crop is None:
            size = self.data.image_size
            resized = TF.resize(image, [self.val_resize], interpolation=self.interpolation, antialias=True)
            return TF.center_crop(resized, [size, size])
        return TF.resized_crop(image, *plan.crop, size=[self.train_crop, self.train_crop],
                               interpolation=self.interpolation, antialias=True)

    def apply_operations(self, crops: torch.Tensor, ops: list[list[tuple[str, float]]]) -> torch.Tensor:
        """Each sample's policy operations, in its order, batched: a call per (operation, magnitude) for the
        samples that drew it (torchvision's kernels treat each image of a batch on its own), and one
        grid_sample for all the geometric ones (each with its own matrix; per sample they were 30 ops each).
        Every dispatch here is a kernel launch on a GPU, paid by the training thread."""
        for turn in range(max(map(len, ops), default=0)):
            groups: dict[tuple[str, float], list[int]] = {}
            for row, sample_ops in enumerate(ops):
                if turn < len(sample_ops) and sample_ops[turn][0] != "Identity":
                    groups.setdefault(sample_ops[turn], []).append(row)
            geometric = [(row, op, magnitude) for (op, magnitude), rows in groups.items() if op in GEOMETRIC
                         for row in rows]
            if geometric:
                rows = [row for row, _, _ in geometric]
                matrices = [inverse_affine_matrix(op, magnitude, crops.shape[-1]) for _, op, magnitude in geometric]
                crops[rows] = warped(crops[rows], matrices, self.policy.interpolation)
            for (op, magnitude), rows in groups.items():
                if op not in GEOMETRIC:
                    at = rows[0] if len(rows) == 1 else rows  # one sample: a view, no gather and scatter
                    crops[at] = self.policy._apply_image_or_video_transform(
                        crops[at], op, magnitude, interpolation=self.policy.interpolation, fill=self.policy._fill)
        return crops


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def inverse_affine_matrix(op: str, magnitude: float, size: int) -> list[float]:
    """The inverse 2 x 3 matrix (output pixel -> input pixel, origin at the image centre) of a geometric
    auto-augment operation on a size x size image, with the arguments torchvision's auto-augment passes to
    F.affine / F.rotate: shears about the top-left corner, translations by whole pixels, rotation about the
    centre."""
    corner = [-0.5 * size, -0.5 * size]
    if op == "Rotate":
        return _get_inverse_affine_matrix([0.0, 0.0], -magnitude, [0.0, 0.0], 1.0, [0.0, 0.0])
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, shear)
    shift = [float(int(magnitude)), 0.0] if op == "TranslateX" else [0.0, float(int(magnitude))]
    return _get_inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])


def warped(images: torch.Tensor, matrices: list[list[float]], interpolation) -> torch.Tensor:
    """uint8 images (N x C x S x S) each resampled through its own inverse affine matrix, outside filled with 0:
    torchvision's tensor affine (its grid of pixel centres, grid_sample, rounding) with a matrix per image."""
    count, size = images.shape[0], images.shape[-1]
    theta = torch.tensor(matrices, dtype=torch.float32, device=images.device).view(count, 2, 3)
    centres = torch.linspace((1.0 - size) * 0.5, (size - 1.0) * 0.5, steps=size, device=images.device)
    base = torch.empty(1, size, size, 3, device=images.device)
    base[..., 0].copy_(centres)
    base[..., 1].copy_(centres.unsqueeze(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * size, 0.5 * size], device=images.device))
    grid = base.view(1, size * size, 3).expand(count, -1, -1).bmm(scaled).view(count, size, size, 2)
    mode = InterpolationMode(interpolation).value
    resampled = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return resampled.round_().to(images.dtype)


def mix_labels(targets: torch.Tensor, num_classes: int, lam: float) -> torch.Tensor:
    """Soft labels of a batch mixed with its previous sample (weight 1 - lam), as torchvision's MixUp/CutMix."""
    labels = F.one_hot(targets, num_classes).float()
    return labels.roll(1, 0).mul_(1.0 - lam).add_(labels.mul(lam))
