"""Reading image files as uint8 tensors (data.decode=tensor), the image loader's default.

JPEG files are decoded by `torchvision.io.decode_jpeg` (libjpeg-turbo, as PIL uses: the pixels are the same
bit for bit) straight into a 3 x H x W uint8 tensor, which the recipe's transforms.v2 then crop, flip and
augment before the crop becomes float. Every other file, and every JPEG that decode_jpeg refuses (truncated,
corrupt), goes through PIL exactly as the PIL path reads it (`convert("RGB")`), so grayscale, CMYK, palette,
16-bit PNG and unreadable files give the same pixels or the same error as there.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

JPEG_START = b"\xff\xd8"


def read_rgb_tensor(path: str) -> torch.Tensor:
    """The image at `path` as a 3 x H x W uint8 RGB tensor; raises OSError or ValueError as PIL does for a file
    it cannot read."""
    with open(path, "rb") as f:  # OSError for a missing or unreadable file, as PIL gives
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    if bytes(data[:2].tolist()) == JPEG_START:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL reads it or says why it cannot, in the words the PIL path uses
    return read_with_pil(path)


def read_with_pil(file) -> torch.Tensor:
    """A path or an open binary file, read as the PIL path reads it."""
    if isinstance(file, str):
        with open(file, "rb") as f:
            return read_with_pil(f)
    return F.pil_to_tensor(Image.open(file).convert("RGB"))
