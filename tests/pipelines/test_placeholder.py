"""ThumbHash placeholders, checked as the page uses them: the hash decodes back to a tiny picture
with the source's shape and mean colour."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

from pipelines.placeholder import aspect_ratio, rgba_to_thumbhash, thumbhash_file, thumbhash_to_rgba

REAL = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "real"


def _decoded(hash_b64: str) -> Image.Image:
    w, h, pixels = thumbhash_to_rgba(base64.b64decode(hash_b64))
    return Image.frombytes("RGBA", (w, h), pixels)


@pytest.mark.parametrize("name", ["wood.jpg", "chelsea.png", "kodim03.png", "rommel.jpg"])
def test_a_photo_hash_decodes_to_its_mean_colour_and_shape(name: str) -> None:
    src = REAL / name
    placeholder = thumbhash_file(src)
    assert 20 <= len(base64.b64decode(placeholder)) <= 25 and len(placeholder) <= 64  # fits the model's field
    with Image.open(src) as img:
        source = img.convert("RGB")
    tiny = _decoded(placeholder)
    assert max(tiny.size) == 32
    mean, want = ImageStat.Stat(tiny.convert("RGB")).mean, ImageStat.Stat(source).mean
    assert all(abs(a - b) <= 8 for a, b in zip(mean, want, strict=True)), (mean, want)
    assert aspect_ratio(base64.b64decode(placeholder)) == pytest.approx(source.width / source.height, rel=0.3)


def test_portrait_and_transparency_survive(tmp_path: Path) -> None:
    """A tall picture stays tall; a transparent one keeps its alpha (the page shows through)."""
    img = Image.new("RGBA", (60, 120), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((0, 60, 59, 119), fill=(200, 40, 40, 255))
    path = tmp_path / "half.png"
    img.save(path)
    tiny = _decoded(thumbhash_file(path))
    assert tiny.height > tiny.width
    quarter = tiny.height // 4
    top = tiny.crop((0, 0, tiny.width, quarter))
    bottom = tiny.crop((0, 3 * quarter, tiny.width, tiny.height))
    assert ImageStat.Stat(top).mean[3] < 60 and ImageStat.Stat(bottom).mean[3] > 200
    r, g, b, _ = ImageStat.Stat(bottom).mean
    assert r > 150 and g < 90 and b < 90


def test_pictures_larger_than_100_px_are_refused_by_the_encoder() -> None:
    with pytest.raises(ValueError, match="100x100"):
        rgba_to_thumbhash(101, 10, bytes(101 * 10 * 4))
