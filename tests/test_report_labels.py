"""The confusion-matrix picture labels every class legibly: in a font that has its glyphs, else by its index."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFont

from modelship.fonts import drawable, label_fonts
from modelship.report import confusion_png


def test_a_missing_glyph_is_told_from_a_drawn_one() -> None:
    pillow = ImageFont.load_default(size=12)  # Pillow's own font: Latin letters, no CJK
    assert drawable("circle", pillow) and drawable("two words", pillow)
    assert not drawable("猫", pillow) and not drawable("cat 猫", pillow)


def test_class_names_are_drawn_in_a_font_that_has_them_or_labelled_by_index(tmp_path: Path) -> None:
    classes = ["café", "naïve", "猫", "plain"]
    drawn = confusion_png([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], classes, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 100
    fonts = label_fonts(12)
    for name, label in zip(classes, drawn, strict=True):
        if any(drawable(name, f) for f in fonts):
            assert label == name  # whatever this machine has that draws it
        else:
            assert label == f"class {classes.index(name)}"  # never a row of empty boxes
        assert any(drawable(label, f) for f in fonts)
    assert drawn[0] == "café" and drawn[3] == "plain"
