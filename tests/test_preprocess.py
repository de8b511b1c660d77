"""The shared eval preprocessing on what phones, scanners and editors write: EXIF orientation and alpha."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from modelship.preprocess import Preprocess, decode_image, preprocess_image

PRE = Preprocess(size=(6, 4), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def test_a_photo_stored_sideways_with_an_orientation_tag_is_read_upright() -> None:
    rng = np.random.default_rng(0)
    upright = Image.fromarray(np.repeat(rng.integers(0, 256, (6, 4, 1), dtype=np.uint8) // 64 * 64, 3, axis=2))
    # a phone held upright stores the sensor's landscape pixels and tag 6: "rotate 90 degrees clockwise to view"
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    as_stored = decode_image(jpeg_with_orientation(stored, 1))
    tagged = decode_image(jpeg_with_orientation(stored, 6))
    plain = decode_image(jpeg_with_orientation(upright, 1))
    assert as_stored.size == (6, 4) and tagged.size == (6, 4)  # PIL itself leaves the pixels as stored
    np.testing.assert_allclose(preprocess_image(tagged, PRE), preprocess_image(plain, PRE), atol=4 / 255)
    assert np.abs(preprocess_image(as_stored, PRE) - preprocess_image(plain, PRE)).max() > 0.2


def test_alpha_is_composited_on_black_whatever_colour_transparent_pixels_hold(tmp_path: Path) -> None:
    rgba = np.zeros((6, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[:3, :, 3] = 255  # ... opaque in the top half, fully transparent below
    rgba[3:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = preprocess_image(Image.open(tmp_path / "a.png"), PRE)
    assert x[:, :3].min() == 1.0 and x[:, 3:].max() == 0.0
    gray = preprocess_image(Image.open(tmp_path / "a.png"), Preprocess((6, 4), 1, (0.0,), (1.0,)))
    assert gray[:, :3].min() == 1.0 and gray[:, 3:].max() == 0.0
