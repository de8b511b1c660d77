"""Class names drawn legibly in pictures (the confusion matrix): in a font that has every glyph of the name, else as
the class's index, never as a row of empty boxes. Pillow's own TrueType font covers ASCII only; wider fonts are used
when the machine has them. PIL only."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

# fonts with wide coverage, when the machine has them (Pillow finds them by file name in the system font folders);
# Pillow's own font, always there, covers Latin only
LABEL_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc", "NotoSansCJKjp-Regular.otf",
               "DroidSansFallbackFull.ttf", "wqy-microhei.ttc")  # fmt: skip
NO_GLYPH = "\U0010fffd"  # a private-use code point no font draws: what a missing glyph looks like in a font


def _glyph(font: Any, ch: str) -> bytes:
    canvas = Image.new("L", (32, 32))
    ImageDraw.Draw(canvas).text((4, 4), ch, fill=255, font=font)
    return canvas.tobytes()


def drawable(text: str, font: Any) -> bool:
    """Every character of `text` has a glyph in `font` (a missing one would be drawn as the font's empty box)."""
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow's bitmap font: Latin-1
        return all(32 <= ord(ch) < 256 for ch in text)
    missing = _glyph(font, NO_GLYPH)
    return all(ch.isspace() or _glyph(font, ch) != missing for ch in text)


def label_fonts(size: int) -> list[Any]:
    """The wide-coverage fonts this machine has, then Pillow's own (ASCII), then its bitmap font (Latin-1)."""
    found = []
    for name in LABEL_FONTS:
        try:
            found.append(ImageFont.truetype(name, size))
        except OSError:
            continue
    return [*found, ImageFont.load_default(size=size), ImageFont.load_default_imagefont()]


def draw_right(draw: Any, xy: tuple[int, int], text: str, font: Any, fill: str) -> None:
    """`text` ending at x, centred on y (anchors are for TrueType fonts only)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, fill=fill, font=font, anchor="rm")
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left), xy[1] - (bottom - top) // 2), text, fill=fill, font=font)


def class_labels(classes: list[str], size: int) -> list[tuple[str, Any]]:
    """(text, font) for each class: its name in the first font that has every glyph of it, else its index (the
    HTML page beside the picture names every class in the browser's fonts), never a row of empty boxes."""
    fonts = label_fonts(size)
    out = []
    for i, name in enumerate(classes):
        font = next((f for f in fonts if drawable(name, f)), None)
        out.append((name, font) if font is not None else (f"class {i}", fonts[-2]))
    return out
