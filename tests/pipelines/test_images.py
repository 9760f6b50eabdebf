"""The image pipeline as a user sees it: what comes out opens, is the right size and way up, and
carries nothing private; what is hostile fails with a code and a sentence, never a dead worker."""

from __future__ import annotations

import base64
import faulthandler
import io
import os
import resource
import signal
import threading
import time
import typing
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageFile

from pipelines import images, sandbox
from pipelines.errors import InvalidInput, MediaError, ProcessingTimeout, TooLarge, TransientError
from pipelines.images import (
    DAMAGED,
    ImageEncodeResult,
    ImageInfo,
    ImagePlan,
    image_decode,
    image_encode,
    image_normalize,
)
from pipelines.placeholder import thumbhash_file, thumbhash_to_rgba
from pipelines.profiles import Profiles
from pipelines.results import from_json, to_json
from tests.pipelines.conftest import exited

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
REAL = TESTDATA / "real"
HOSTILE = TESTDATA / "hostile"

PROFILES = Profiles()
LONG_EDGE = PROFILES.image.long_edge

pytestmark = pytest.mark.skipif(not TESTDATA.is_dir(), reason="shared test media not present")


# ---- helpers


Processed = tuple[ImageInfo, ImagePlan, ImageEncodeResult]


def process(src: Path, out_dir: Path, profiles: Profiles = PROFILES) -> Processed:
    info = image_decode(src, out_dir, limits=profiles.limits)
    plan = image_normalize(info, profiles=profiles)
    result = image_encode(src, info, plan, out_dir, profiles=profiles, limits=profiles.limits)
    return info, plan, result


def open_output(out_dir: Path, result: ImageEncodeResult, role: str) -> ImageFile.ImageFile:
    (output,) = [o for o in result.outputs if o.role == role]
    im = Image.open(out_dir / output.file)
    im.load()
    return im


def both_outputs(out_dir: Path, result: ImageEncodeResult) -> list[ImageFile.ImageFile]:
    return [open_output(out_dir, result, "image_avif"), open_output(out_dir, result, "image_webp")]


def frames_of(im: Image.Image) -> int:
    return int(getattr(im, "n_frames", 1))


def rgb_at(im: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    pixel = im.convert("RGB").getpixel(xy)
    assert isinstance(pixel, tuple)
    return pixel


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=False))


def assert_no_metadata(path: Path) -> None:
    im = Image.open(path)
    assert not im.info.get("exif"), "EXIF left in output"
    assert not im.info.get("xmp"), "XMP left in output"
    assert not im.info.get("icc_profile"), "ICC profile left in output"
    assert len(im.getexif()) == 0


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


# ---- ordinary uploads


def test_real_jpeg_is_turned_upright_and_encoded(out_dir: Path) -> None:
    info, plan, result = process(REAL / "rommel.jpg", out_dir)

    # rommel.jpg is stored landscape with EXIF orientation 6: people see it portrait.
    assert (info.container, info.mime, info.width, info.height) == ("jpeg", "image/jpeg", 3072, 2304)
    assert info.orientation == 6 and info.had_metadata and not info.animated
    assert (plan.width, plan.height) == (1536, 2048)

    assert {o.role for o in result.outputs} == {"image_avif", "image_webp"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["image.avif", "image.webp"]
    for output in result.outputs:
        path = out_dir / output.file
        assert not Path(output.file).is_absolute()
        assert (output.width, output.height) == (1536, 2048)
        assert output.bytes == path.stat().st_size > 1000
        im = Image.open(path)
        assert im.size == (1536, 2048)
        assert (im.format, output.codec, output.content_type) == {
            "image_avif": ("AVIF", "av1", "image/avif"),
            "image_webp": ("WEBP", "webp", "image/webp"),
        }[output.role]
        assert_no_metadata(path)
    assert result.peak_rss_bytes > 0


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("wood.jpg", (512, 512)),
        ("chelsea.png", (451, 300)),  # smaller than the long edge: never upscaled
        ("kodim03.png", (768, 512)),
        ("pug.heic", (2048, 1536)),
        ("xiaomi.heic", (2048, 1536)),
        ("cat.hif", (2048, 1368)),  # 10-bit HEIF
    ],
)
def test_real_images_come_out_at_the_right_size(out_dir: Path, name: str, size: tuple[int, int]) -> None:
    _, plan, result = process(REAL / name, out_dir)

    assert (plan.width, plan.height) == size
    for im in both_outputs(out_dir, result):
        assert im.size == size
        assert im.mode == "RGB"
    for output in result.outputs:
        assert_no_metadata(out_dir / output.file)


def test_heic_is_recognised_by_content(out_dir: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "holiday.jpg"
    disguised.write_bytes((REAL / "xiaomi.heic").read_bytes())

    info = image_decode(disguised, out_dir, limits=PROFILES.limits)

    assert (info.container, info.mime) == ("heif", "image/heic")


def test_results_round_trip_through_json(out_dir: Path) -> None:
    info, plan, result = process(REAL / "chelsea.png", out_dir)

    assert from_json(ImageInfo, to_json(info)) == info
    assert from_json(ImagePlan, to_json(plan)) == plan
    assert from_json(ImageEncodeResult, to_json(result)) == result


def test_profile_long_edge_is_respected(out_dir: Path) -> None:
    # 3072 -> 512 is a 1/6 reduction: the JPEG is decoded at 1/4 scale in the DCT, then resampled.
    profiles = Profiles.from_overrides({"image": {"long_edge": 512}})

    _, plan, result = process(REAL / "rommel.jpg", out_dir, profiles)

    assert (plan.width, plan.height) == (384, 512)
    assert [im.size for im in both_outputs(out_dir, result)] == [(384, 512), (384, 512)]


# ---- orientation, metadata, colour, modes


def _marked_jpeg(path: Path, orientation: int) -> None:
    """A 400x200 blue JPEG with a red block in its stored top-left corner."""
    im = Image.new("RGB", (400, 200), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 100, 50))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", quality=95, exif=exif)


def test_exif_orientation_6_is_applied(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "phone.jpg"
    _marked_jpeg(src, orientation=6)

    info, plan, result = process(src, out_dir)

    assert info.orientation == 6
    assert (plan.width, plan.height) == (200, 400)
    for im in both_outputs(out_dir, result):
        rgb = im.convert("RGB")
        assert rgb.size == (200, 400)
        # Orientation 6 shows the stored top-left corner at the top right.
        assert close_to(rgb_at(rgb, (190, 10)), (255, 0, 0)), im.format
        assert close_to(rgb_at(rgb, (10, 10)), (0, 0, 255)), im.format
        assert close_to(rgb_at(rgb, (190, 390)), (0, 0, 255)), im.format
        assert len(im.getexif()) == 0  # nothing left that would rotate it a second time


def test_gps_exif_and_xmp_are_stripped(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "located.jpg"
    exif = Image.Exif()
    exif[0x010F] = "SpyCam Industries"  # Make
    exif[0x0110] = "Model 3000"  # Model
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>secret-creator</rdf:RDF></x:xmpmeta>'
    Image.new("RGB", (64, 48), (90, 140, 60)).save(src, "JPEG", exif=exif, xmp=xmp)
    assert Image.open(src).getexif().get_ifd(0x8825), "the fixture must carry GPS"

    info, _, result = process(src, out_dir)

    assert info.had_metadata
    for output in result.outputs:
        path = out_dir / output.file
        assert_no_metadata(path)
        assert not Image.open(path).getexif().get_ifd(0x8825)
        data = path.read_bytes()
        for needle in (b"Exif", b"SpyCam", b"Model 3000", b"secret-creator", b"xmpmeta"):
            assert needle not in data


def test_plain_png_reports_no_metadata(out_dir: Path) -> None:
    info = image_decode(REAL / "chelsea.png", out_dir, limits=PROFILES.limits)

    assert not info.had_metadata


def test_wide_gamut_is_converted_to_srgb_and_profile_dropped(tmp_path: Path, out_dir: Path) -> None:
    # The Display P3 profile of a real iPhone photo, on a flat, saturated colour.
    _register_heif()
    p3: bytes = Image.open(REAL / "pug.heic").info["icc_profile"]
    src = tmp_path / "p3.png"
    colour = Image.new("RGB", (64, 64), (200, 60, 40))
    colour.save(src, "PNG", icc_profile=p3)
    expected = ImageCms.profileToProfile(
        colour, ImageCms.ImageCmsProfile(io.BytesIO(p3)), ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    assert expected is not None
    want = rgb_at(expected, (32, 32))
    assert want[0] > 200  # P3 red is redder than sRGB can say

    _, _, result = process(src, out_dir)

    for im in both_outputs(out_dir, result):
        assert not im.info.get("icc_profile")
        got = rgb_at(im, (32, 32))
        assert close_to(got, want, tolerance=8), (im.format, got, want)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_wide_gamut_photo_is_converted_on_both_halves(tmp_path: Path, out_dir: Path, mode: str) -> None:
    # Above 1 MP out, resize and colour conversion run in two bands on two threads: both bands,
    # and the rows at their seam, come out converted (and the alpha kept where there is one).
    _register_heif()
    p3: bytes = Image.open(REAL / "pug.heic").info["icc_profile"]
    src = tmp_path / "p3.png"
    top, bottom = (200, 60, 40), (40, 170, 90)
    picture = Image.new(mode, (2400, 1800), (*top, 255))
    picture.paste((*bottom, 128), (0, 1350, 2400, 1800))  # out: from row 1152
    picture.save(src, "PNG", icc_profile=p3, compress_level=1)
    to_srgb = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(io.BytesIO(p3)), ImageCms.createProfile("sRGB"), "RGB", "RGB"
    )
    want = {}
    for name, colour in (("top", top), ("bottom", bottom)):
        converted = ImageCms.applyTransform(Image.new("RGB", (1, 1), colour), to_srgb)
        assert converted is not None
        want[name] = rgb_at(converted, (0, 0))

    _, plan, result = process(src, out_dir)

    assert (plan.width, plan.height) == (2048, 1536)
    for im in both_outputs(out_dir, result):
        assert im.size == (2048, 1536)
        for y in (10, 700, 766, 767, 768, 769, 1000):  # the bands meet between rows 767 and 768
            assert close_to(rgb_at(im, (1000, y)), want["top"], tolerance=8), (im.format, y)
        if mode == "RGBA":
            assert im.mode == "RGBA"
            assert im.getpixel((1000, 1500))[3] == pytest.approx(128, abs=8)
        else:
            assert close_to(rgb_at(im, (1000, 1500)), want["bottom"], tolerance=8), im.format


def test_phone_jpeg_decoded_at_a_dct_scale_is_upright_and_converted(tmp_path: Path, out_dir: Path) -> None:
    # A large JPEG is decoded by libjpeg-turbo at the smallest M/8 scale that still covers the
    # output (here 5/8, which Pillow's draft cannot do), with the EXIF orientation and the
    # Display P3 profile still read from the file and applied after the resize.
    _register_heif()
    p3: bytes = Image.open(REAL / "pug.heic").info["icc_profile"]
    src = tmp_path / "phone.jpg"
    left, right = (200, 60, 40), (40, 170, 90)
    stored = Image.new("RGB", (3300, 2475), left)
    stored.paste(right, (1650, 0, 3300, 2475))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: stored left is shown on top
    stored.save(src, "JPEG", quality=95, icc_profile=p3, exif=exif.tobytes())
    with Image.open(src) as opened:
        scaled = images._jpeg_scaled(str(src), opened, (2048, 1536))  # as stored
    assert scaled is not None and scaled.size == (2063, 1547)  # 5/8, not full size
    to_srgb = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(io.BytesIO(p3)), ImageCms.createProfile("sRGB"), "RGB", "RGB"
    )
    want = {}
    for name, colour in (("top", left), ("bottom", right)):
        converted = ImageCms.applyTransform(Image.new("RGB", (1, 1), colour), to_srgb)
        assert converted is not None
        want[name] = rgb_at(converted, (0, 0))

    _, plan, result = process(src, out_dir)

    assert (plan.width, plan.height) == (1536, 2048)
    for im in both_outputs(out_dir, result):
        assert im.size == (1536, 2048)
        assert not im.info.get("icc_profile") and len(im.getexif()) == 0
        assert close_to(rgb_at(im, (768, 300)), want["top"], tolerance=8), (im.format, "top")
        assert close_to(rgb_at(im, (768, 1750)), want["bottom"], tolerance=8), (im.format, "bottom")


def test_heic_pixels_are_decoded_once_by_encode(out_dir: Path) -> None:
    # The decode stage proves a HEIF whole from its header and boxes; its HEVC tiles (a third of a
    # second of CPU for 12 MP) are decoded once, by encode. CPU time, so a busy machine cannot fail it.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = image_decode(REAL / "pug.heic", out_dir, limits=PROFILES.limits)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    assert (info.width, info.height, info.mode) == (4032, 3024, "RGB")
    assert cpu < 0.12, f"the decode stage used {cpu * 1000:.0f} ms of CPU"
    plan = image_normalize(info, profiles=PROFILES)
    result = image_encode(REAL / "pug.heic", info, plan, out_dir, profiles=PROFILES, limits=PROFILES.limits)
    assert [im.size for im in both_outputs(out_dir, result)] == [(2048, 1536)] * 2


@pytest.mark.parametrize("name", ["pug.heic", "xiaomi.heic"])
def test_heic_bands_read_the_decoders_buffer_with_the_same_pixels(name: str) -> None:
    # A HEIF still is not copied whole into Pillow (36 MB for 12 MP, on one core): each band of
    # the resize copies the rows it reads from pillow-heif's buffer. Same picture as resizing the
    # loaded image, upright or turned (to rounding: Pillow may order its two passes differently).
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageChops

    _register_heif()
    with Image.open(REAL / name, formats=["HEIF"]) as opened, Image.open(REAL / name, formats=["HEIF"]) as loaded:
        rows = images._heif_rows(opened, (2048, 1536))
        assert rows is not None, "the encode would copy the whole picture into Pillow first"
        loaded.load()
        to_srgb = images._srgb_converter("RGB", opened.info.get("icc_profile"))
        with ThreadPoolExecutor(max_workers=2) as pool:
            for orientation in (1, 6):
                banded = images._resize_convert_turn(rows, (2048, 1536), to_srgb, orientation, pool)
                whole = images._resize_convert_turn(loaded, (2048, 1536), to_srgb, orientation, pool)
                assert banded.size == whole.size == images._upright_size(2048, 1536, orientation)
                extrema = ImageChops.difference(banded, whole).getextrema()
                assert max(high for _, high in typing.cast(list[tuple[int, int]], extrema)) <= 1


def _register_heif() -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()


def test_transparency_is_kept(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "logo.png"
    im = Image.new("RGBA", (120, 80), (255, 0, 0, 255))
    im.paste((0, 0, 0, 0), (60, 0, 120, 80))
    im.save(src)

    info, _, result = process(src, out_dir)

    assert info.has_alpha
    for out in both_outputs(out_dir, result):
        assert out.mode == "RGBA"
        alpha = out.getchannel("A")
        assert alpha.getpixel((10, 40)) == 255
        assert alpha.getpixel((110, 40)) == 0


def test_opaque_alpha_is_dropped(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "opaque.png"
    Image.new("RGBA", (50, 50), (0, 128, 0, 255)).save(src)

    _, _, result = process(src, out_dir)

    assert [im.mode for im in both_outputs(out_dir, result)] == ["RGB", "RGB"]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("P", None, (200, 30, 30)),
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 255), (100, 100, 100)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 32768, (128, 128, 128)),  # 16-bit grey: halfway, not clipped to white
        ("1", 1, (255, 255, 255)),
    ],
)
def test_other_modes_are_converted(
    tmp_path: Path, out_dir: Path, mode: str, value: object, expected: tuple[int, int, int]
) -> None:
    if mode == "P":
        im = Image.new("RGB", (40, 40), expected).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        im = Image.new(mode, (40, 40), value)  # type: ignore[arg-type]
    src = tmp_path / ("cmyk.jpg" if mode == "CMYK" else "mode.png")
    im.save(src)

    info, _, result = process(src, out_dir)

    assert info.mode == mode
    for out in both_outputs(out_dir, result):
        pixel = rgb_at(out, (20, 20))
        assert close_to(pixel, expected, tolerance=16), (out.format, pixel)


# ---- animation


def test_animated_gif_becomes_animated_webp_and_avif(out_dir: Path) -> None:
    info, plan, result = process(REAL / "newtonscradle.gif", out_dir)

    assert info.animated and info.frames == 36 and plan.frames == 36
    source = Image.open(REAL / "newtonscradle.gif")
    durations = []
    for index in range(frames_of(source)):
        source.seek(index)
        durations.append(source.info["duration"])
    for out in both_outputs(out_dir, result):
        assert getattr(out, "is_animated", False) and frames_of(out) == 36, out.format
        assert out.size == (200, 150)
    webp = open_output(out_dir, result, "image_webp")
    assert webp.info["loop"] == 0  # the GIF loops forever, so does the WebP
    seen = []
    for index in range(frames_of(webp)):
        webp.seek(index)
        webp.load()
        seen.append(webp.info["duration"])
    assert seen == durations
    assert {o.duration for o in result.outputs} == {sum(durations) / 1000}


def test_animated_webp_keeps_frames_timing_and_loop(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (3000, 100), (i * 80, 40, 0)) for i in range(3)]
    frames[0].save(src, "WEBP", save_all=True, append_images=frames[1:], duration=[5, 120, 200], loop=3)

    info, plan, result = process(src, out_dir)

    assert info.animated and info.frames == 3
    assert (plan.width, plan.height) == (LONG_EDGE, 68)
    webp = open_output(out_dir, result, "image_webp")
    assert frames_of(webp) == 3 and webp.info["loop"] == 3 and webp.size == (LONG_EDGE, 68)
    assert frames_of(open_output(out_dir, result, "image_avif")) == 3
    # A 5 ms frame is shown for 100 ms by browsers; we write what people actually saw.
    assert {o.duration for o in result.outputs} == {(100 + 120 + 200) / 1000}


def test_transparent_animated_gif_stays_transparent(tmp_path: Path, out_dir: Path) -> None:
    # A sticker: a moving square on a transparent background, the border never drawn.
    src = tmp_path / "sticker.gif"
    frames = []
    for i in range(4):
        frame = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        frame.paste((255, 200, 0, 255), (16 + i * 4, 16, 40 + i * 4, 40))
        frames.append(frame)
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=80, loop=0, disposal=2)

    info, _, result = process(src, out_dir)

    assert info.animated and info.has_alpha
    for out in both_outputs(out_dir, result):
        assert frames_of(out) == 4, out.format
        assert out.mode == "RGBA", out.format
        assert out.getchannel("A").getpixel((2, 2)) == 0, out.format
        assert close_to(rgb_at(out, (24, 24)), (255, 200, 0)), out.format


def test_animated_png_is_animated(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "anim.png"
    frames = [Image.new("RGB", (90, 60), colour) for colour in ("red", "green", "blue")]
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=100, loop=0)

    info, _, result = process(src, out_dir)

    assert info.animated and info.frames == 3
    assert [frames_of(out) for out in both_outputs(out_dir, result)] == [3, 3]


def test_too_many_frames_is_too_large(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "long.gif"
    frames = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(5)]
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=50)
    profiles = Profiles.from_overrides({"limits": {"max_animation_frames": 3}})

    with pytest.raises(TooLarge) as caught:
        image_decode(src, out_dir, limits=profiles.limits)

    assert caught.value.code == "too_large"
    assert caught.value.message == "The animation has 5 frames; the limit is 3 frames."


def test_normalize_refuses_an_animation_that_cannot_fit_in_memory() -> None:
    info = ImageInfo("gif", "image/gif", 4000, 4000, 2000, True, 1, "P", False, False)

    with pytest.raises(TooLarge) as caught:
        image_normalize(info, profiles=PROFILES)

    assert "2000 frames of 2048x2048 pixels" in caught.value.message


# ---- limits and hostile files


def test_200_megapixel_heic_is_too_large(out_dir: Path) -> None:
    with pytest.raises(TooLarge) as caught:
        image_decode(HOSTILE / "heif_200megapixel.heic", out_dir, limits=PROFILES.limits)

    assert caught.value.code == "too_large"
    assert caught.value.message == "The image is 200 megapixels; the limit is 100 megapixels."


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "big.png"
    Image.new("RGB", (1500, 1000)).save(src)
    profiles = Profiles.from_overrides({"limits": {"max_image_pixels": 1_000_000}})

    with pytest.raises(TooLarge) as caught:
        image_decode(src, out_dir, limits=profiles.limits)

    assert caught.value.message == "The image is 1.5 megapixels; the limit is 1 megapixels."


@pytest.mark.parametrize(
    "name",
    [
        "pillow_decompression_bomb.gif",
        "pillow_decompression_bomb_extents.gif",
        "pillow_png_decompression_dos.png",
    ],
)
def test_decompression_bombs_are_too_large(out_dir: Path, name: str) -> None:
    with pytest.raises(TooLarge) as caught:
        image_decode(HOSTILE / name, out_dir, limits=PROFILES.limits)

    assert caught.value.code == "too_large"
    assert caught.value.message.startswith("The image ")


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize(
    "name",
    [
        "pillow_truncated_jpeg.jpg",
        "pillow_truncated_image.png",
        "pillow_truncated_end_chunk.png",
        "heif_truncated.heic",
        "heif_corrupted.heic",
    ],
)
def test_truncated_and_corrupt_files_are_refused(out_dir: Path, name: str) -> None:
    # Chosen behaviour: a file that lacks bytes its pixels need is refused, never half-processed
    # (a JPEG's or a HEIF's pixels are decoded by encode, so the refusal may come from there).
    with pytest.raises(InvalidInput) as caught:
        process(HOSTILE / name, out_dir)

    assert caught.value.code == "invalid_input"
    assert caught.value.message == DAMAGED
    assert caught.value.detail


@pytest.mark.parametrize("name", ["rommel.jpg", "pug.heic", "newtonscradle.gif", "kodim03.png"])
def test_real_files_cut_in_half_are_refused(tmp_path: Path, out_dir: Path, name: str) -> None:
    # pug.heic is the sharp case: libheif would decode it "successfully", missing tiles painted green.
    src = _cut(REAL / name, tmp_path / name, 0.5)

    with pytest.raises(InvalidInput) as caught:
        process(src, out_dir)

    assert caught.value.message == DAMAGED


def test_file_with_only_a_damaged_marker_is_processed(out_dir: Path) -> None:
    # Its APP14 segment is short, but every pixel is there: the outputs are valid.
    _, _, result = process(HOSTILE / "pillow_truncated_app14.jpg", out_dir)

    assert [im.size for im in both_outputs(out_dir, result)] == [(100, 100), (100, 100)]


def test_empty_file_is_refused(out_dir: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        image_decode(HOSTILE / "heif_empty.heic", out_dir, limits=PROFILES.limits)

    assert caught.value.message == "The file is empty."


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("imagemagick_local_file.svg", InvalidInput),
        ("imagetragick_exfiltration.jpg", InvalidInput),
        ("imagetragick_url_curl.png", InvalidInput),
        ("php_shell.jpg.php", InvalidInput),
        ("zip_symlink_etc_passwd.zip", MediaError),
        ("pillow_tiff_overflow_rows_per_strip.tif", MediaError),
        ("pillow_psd-oob-write-overflow.psd", MediaError),
        ("pillow_reallybig.bmp", MediaError),
        ("pillow_timeout-c60a3d7314213624607bfb3e38d551a8b24a7435.dds", MediaError),
        ("pillow_timeout-9139147ce93e20eb14088fe238e541443ffd64b3.fli", InvalidInput),
        ("ffmpeg_hls_read_passwd.avi", InvalidInput),  # a video, not an image
    ],
)
def test_non_images_never_reach_a_decoder(out_dir: Path, name: str, error: type[MediaError]) -> None:
    with pytest.raises(error) as caught:
        image_decode(HOSTILE / name, out_dir, limits=PROFILES.limits)

    assert caught.value.code in ("invalid_input", "unsupported_codec")
    assert caught.value.message.endswith(".")
    assert not out_dir.exists()


def test_pillow_may_only_use_the_sniffed_plugin(
    tmp_path: Path,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The child is forked from here (not from the fork server), so it inherits this spy; it
    # reports through a file.
    monkeypatch.setattr(sandbox, "FORK_SERVER", False)
    calls = tmp_path / "calls.txt"
    real_open = Image.open

    def spy(fp: object, mode: str = "r", formats: list[str] | None = None) -> Image.Image:
        with open(calls, "a") as fh:
            fh.write(f"{formats}\n")
        return real_open(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    disguised = tmp_path / "picture.gif"  # the name lies; the bytes are a PNG
    disguised.write_bytes((REAL / "chelsea.png").read_bytes())

    info, _, _ = process(disguised, out_dir)

    assert info.container == "png"
    assert calls.read_text().splitlines() == ["['PNG']", "['PNG']"]


@pytest.mark.parametrize("name", ["rommel.jpg", "chelsea.png"])
def test_the_webp_carries_a_placeholder_of_the_picture_it_holds(out_dir: Path, name: str) -> None:
    """The encode hashes the picture it writes; the page shows the same blur as a hash of the
    written file would give (the store no longer decodes the file for it)."""
    _, _, result = process(REAL / name, out_dir)

    roles = {o.role: o for o in result.outputs}
    assert roles["image_avif"].placeholder == ""  # one placeholder per item: the WebP's
    ours = thumbhash_to_rgba(base64.b64decode(roles["image_webp"].placeholder))
    from_file = thumbhash_to_rgba(base64.b64decode(thumbhash_file(out_dir / roles["image_webp"].file)))
    assert ours[:2] == from_file[:2]
    differences = [abs(a - b) for a, b in zip(ours[2], from_file[2], strict=True)]
    assert max(differences) <= 8 and sum(differences) / len(differences) <= 2, max(differences)


def test_avif_upload_uses_pillows_avif_reader(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "upload.avif"
    Image.new("RGB", (300, 200), (10, 200, 10)).save(src, "AVIF")

    info, _, result = process(src, out_dir)

    assert (info.container, info.mime) == ("avif", "image/avif")
    assert [im.size for im in both_outputs(out_dir, result)] == [(300, 200), (300, 200)]


# ---- the child process takes the blows


@pytest.fixture
def forked_from_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fork the decoder from this process, not from the sandbox's fork server: the faults these
    tests inject by monkeypatching reach only a child of this process. (The fork server's own
    handling of the same faults: tests/pipelines/test_sandbox.py.)"""
    monkeypatch.setattr(sandbox, "FORK_SERVER", False)


def _crash(*args: object) -> None:
    faulthandler.disable()  # pytest's handler would print the child's stack: expected, but noisy
    os.kill(os.getpid(), signal.SIGSEGV)


def _hog_memory(*args: object) -> None:
    bytearray(8 * 1024**3)


def _address_space_in_use() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _hang(*args: object) -> None:
    signal.pause()  # a decoder stuck for good: only a signal ends it


@pytest.mark.usefixtures("forked_from_here")
def test_decoder_crash_is_contained(monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    monkeypatch.setattr(images, "_check_size", _crash)

    with pytest.raises(TransientError) as caught:
        image_decode(REAL / "chelsea.png", out_dir, limits=PROFILES.limits)

    assert "SIGSEGV" in caught.value.detail
    assert caught.value.retryable


@pytest.mark.usefixtures("forked_from_here")
def test_decoder_out_of_memory_is_too_large(monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    monkeypatch.setattr(images, "_check_size", _hog_memory)
    # The forked child starts with our address space; give it 512 MB more, and it asks for 8 GB.
    budget = _address_space_in_use() + 512 * 1024**2
    profiles = Profiles.from_overrides({"limits": {"memory_bytes": budget}})

    with pytest.raises(TooLarge):
        image_decode(REAL / "chelsea.png", out_dir, limits=profiles.limits)


@pytest.mark.usefixtures("forked_from_here")
def test_decoder_that_hangs_is_stopped(monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    monkeypatch.setattr(images, "_check_size", _hang)
    profiles = Profiles.from_overrides({"limits": {"probe_wall_seconds": 1.0}})
    started = time.monotonic()

    with pytest.raises(ProcessingTimeout):
        image_decode(REAL / "chelsea.png", out_dir, limits=profiles.limits)

    assert time.monotonic() - started < 10


@pytest.mark.usefixtures("forked_from_here")
def test_encoder_crash_is_contained(monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    # Encode's child is reaped in the background once its whole result has arrived; one that dies
    # first is still waited for, and its signal reported.
    info = image_decode(REAL / "chelsea.png", out_dir, limits=PROFILES.limits)
    plan = image_normalize(info, profiles=PROFILES)
    monkeypatch.setattr(images, "_check_size", _crash)

    with pytest.raises(TransientError) as caught:
        image_encode(REAL / "chelsea.png", info, plan, out_dir, profiles=PROFILES, limits=PROFILES.limits)

    assert "SIGSEGV" in caught.value.detail


def _children(parent: int | None = None) -> list[str]:
    """The child processes of ``parent`` (default: us), as ``pid state`` (``Z``: ended, not reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == (parent or os.getpid()):
            found.append(f"{entry.name} {fields[0]}")
    return found


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "forked-here"])
def test_encode_leaves_no_child_behind(out_dir: Path, monkeypatch: pytest.MonkeyPatch, fork_server: bool) -> None:
    monkeypatch.setattr(sandbox, "FORK_SERVER", fork_server)
    # The fork server is a long-lived child by design, as are servers and workers that earlier
    # tests' fixtures started: only new children count, ours and the fork server's.
    server = sandbox.fork_server() if fork_server else None
    before = {entry.split()[0] for entry in _children()}
    _, _, result = process(REAL / "rommel.jpg", out_dir)
    for thread in threading.enumerate():
        if thread.name.startswith("reap-"):
            thread.join(timeout=10)

    assert [entry for entry in _children() if entry.split()[0] not in before] == []
    if server is not None:
        # Its decoders end a moment after their result has reached us (the server then reaps
        # them; that it does: tests/pipelines/test_sandbox.py, the hang test).
        for entry in _children(server.pid):
            assert exited(int(entry.split()[0])), entry
    assert result.peak_rss_bytes > 50 * 1024**2  # the child's own report: it decoded a 7 MP photo


def test_encoder_failure_is_not_blamed_on_the_file(out_dir: Path) -> None:
    # A bad profile is our mistake: it must not reach the user as "your image is damaged".
    profiles = Profiles.from_overrides({"image": {"avif_quality": 500}})
    info = image_decode(REAL / "chelsea.png", out_dir, limits=profiles.limits)
    plan = image_normalize(info, profiles=profiles)

    with pytest.raises(MediaError) as caught:
        image_encode(REAL / "chelsea.png", info, plan, out_dir, profiles=profiles, limits=profiles.limits)

    assert caught.value.code == "internal"
    assert "quality" in caught.value.detail


# ---- HEIF image sequences (issue 15)


def test_heif_image_sequence_is_its_first_picture(tmp_path: Path) -> None:
    """An ``msf1`` HEIF holding only an image sequence (no primary item) was called damaged:
    the output is its first picture, with the colours of the source."""
    from PIL import ImageChops, ImageStat

    from tests.media import make_media

    source = ["-f", "lavfi", "-i", "testsrc2=size=128x96:rate=5:duration=1"]
    seq = make_media(
        tmp_path / "burst.heics",
        [*source, "-c:v", "libx265", "-x265-params", "log-level=error", "-pix_fmt", "yuv420p", "-tag:v", "hvc1",
         "-brand", "msf1", "-f", "mp4"],
    )  # fmt: skip
    reference = make_media(tmp_path / "first.png", [*source, "-frames:v", "1", "-pix_fmt", "rgb24"])
    assert seq.read_bytes()[8:12] == b"msf1"
    info, _, result = process(seq, tmp_path)
    assert (info.width, info.height, info.frames, info.animated) == (128, 96, 1, False)
    with Image.open(reference) as ref:
        expected = ref.convert("RGB")
    small = expected.resize((32, 24), Image.Resampling.BOX)
    for out in both_outputs(tmp_path, result):
        assert out.size == (128, 96) and frames_of(out) == 1
        # Mean colour difference over 4x4 blocks (what survives x265 + AVIF/WebP on testsrc2's fine
        # pattern): 5 measured; a wrong YUV matrix makes green 18 off, a wrong range every channel 12.
        got = out.convert("RGB").resize((32, 24), Image.Resampling.BOX)
        diff = ImageStat.Stat(ImageChops.difference(got, small)).mean
        assert max(diff) < 8, diff


def test_truncated_heif_image_sequence_is_damaged(tmp_path: Path) -> None:
    from tests.media import make_media

    seq = make_media(
        tmp_path / "burst.heics",
        ["-f", "lavfi", "-i", "testsrc2=size=128x96:rate=5:duration=1", "-c:v", "libx265", "-x265-params",
         "log-level=error", "-tag:v", "hvc1", "-brand", "msf1", "-movflags", "+faststart", "-f", "mp4"],
    )  # fmt: skip
    cut = tmp_path / "cut.heics"
    cut.write_bytes(seq.read_bytes()[: seq.stat().st_size // 2])
    with pytest.raises(InvalidInput) as caught:
        process(cut, tmp_path / "out")
    assert caught.value.message == DAMAGED


def test_avif_libavif_cannot_decode_is_the_files_fault(tmp_path: Path) -> None:
    """Pillow's AVIF plugin raises RuntimeError when libavif cannot decode (a broken grid, gain map
    or payload): that is a damaged file (``invalid_input``), not "something went wrong on our side"."""
    good = tmp_path / "good.avif"
    Image.new("RGB", (256, 256), (200, 30, 30)).save(good, "AVIF", quality=60)
    data = good.read_bytes()
    payload = data.index(b"mdat") + 4
    bad = tmp_path / "bad.avif"
    bad.write_bytes(data[:payload] + bytes(len(data) - payload))
    with pytest.raises(InvalidInput) as caught:
        process(bad, tmp_path / "out")
    assert caught.value.code == "invalid_input" and caught.value.message == DAMAGED
    assert "RuntimeError" in caught.value.detail
