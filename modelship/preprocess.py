"""Eval preprocessing: raw image -> float32 [C, H, W], described entirely by a manifest's `preprocess` block.

Training (eval transform), export (real parity inputs) and serving all call `preprocess_image`, so the three stages
agree to the last bit. It needs PIL and numpy only: serving does not import torch or torchvision for it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelship.errors import DataError


@dataclass(frozen=True)
class Preprocess:
    """Apply the EXIF orientation, convert to `channels` (alpha composited on black), resize to `size` (bilinear, no
    crop), scale to [0, 1], normalise by mean/std."""

    size: tuple[int, int]  # (H, W)
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DataError(f"preprocess channels must be 1 or 3, got {self.channels}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise DataError(f"preprocess size must be [H, W] with positive values, got {list(self.size)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(
                f"preprocess mean and std need {self.channels} values each (one per channel), "
                f"got mean={list(self.mean)} std={list(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"preprocess std values must be positive, got {list(self.std)}")

    @classmethod
    def from_dict(cls, block: dict) -> Preprocess:
        """Build from a manifest `preprocess` block or a checkpoint `data` block."""
        size = block["size"] if "size" in block else block["input_shape"][1:]
        channels = block["channels"] if "channels" in block else block["input_shape"][0]
        return cls(
            size=(int(size[0]), int(size[1])),
            channels=int(channels),
            mean=tuple(float(m) for m in block["mean"]),
            std=tuple(float(s) for s in block["std"]),
        )

    def to_dict(self) -> dict:
        """The manifest's `preprocess` block."""
        return {"size": list(self.size), "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored); 1 for a missing or broken EXIF block, which leaves pixels as stored."""
    try:
        return int(image.getexif().get(ORIENTATION, 1) or 1)
    except Exception:  # PIL raises struct.error, OSError, ValueError, ... for a truncated or malformed block
        return 1


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation tag applied (phone photos are often stored sideways)."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


ORIENTATION = 0x0112  # the EXIF orientation tag


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (palette, alpha, 16-bit) to L or RGB; alpha is composited on black."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        # composite on black: transparent pixels become black, whatever colour they were stored with
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        return image if target == "RGB" else image.convert("L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return image if target == "L" else image.convert("RGB")
    return image.convert(target)


def to_array(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """Orient, convert and resize a PIL image to a uint8 array [H, W, C]; the part of preprocessing augmentation
    replaces."""
    image = to_mode(upright(image), pre.channels)
    h, w = pre.size
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(arr: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [H, W, C] -> normalised float32 [C, H, W]."""
    x = arr.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std)


def preprocess_image(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """The eval transform: PIL image -> float32 [C, H, W] ready for the model."""
    return normalize(to_array(image, pre), pre)


class ImageTooLarge(DataError):
    """An image refused for its pixel count before it is decoded."""


def decode_image(data: bytes, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode PNG/JPEG/... bytes fully, so a truncated file fails here and not later; refuse huge images unread."""
    if not data:
        raise DataError(f"{what} is empty; expected PNG or JPEG bytes")
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLarge(f"{what} is {image.width}x{image.height} pixels; the limit is {max_pixels} pixels")
        image.load()
    except UnidentifiedImageError:
        raise DataError(f"{what} is not an image PIL can read; expected PNG or JPEG bytes") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{what} has too many pixels to decode ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{what} could not be decoded ({e}); the file may be truncated or corrupt") from None
    return image
