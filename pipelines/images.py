"""Image stages: decode (prove the file reads, learn its shape), normalize (plan the output), encode.

Every byte of the upload is parsed in a forked child under hard limits (``pipelines.sandbox``):
the worker itself only reads the first bytes to sniff the type. Pillow is told which single
plugin it may use, so a file that merely *claims* to be a JPEG can never reach, say, the TIFF
or PSD decoder.

Behaviours chosen here, and why:

* Truncated or damaged files are refused (``invalid_input``), never half-processed. That is what
  Pillow does when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off (we leave it off): a JPEG, PNG or
  GIF frame that needs bytes the file lacks raises "image file is truncated". libheif does not:
  it paints the tiles it cannot find green and reports success, so for HEIF we walk the top-level
  boxes and refuse a file that ends inside one. A GIF cut exactly between two frames cannot be
  told from a shorter GIF and is processed with the frames it has.
* Metadata is stripped: no EXIF (so no GPS), no XMP, no comments, no ICC profile. Colour is kept
  right by converting pixels that carry a non-sRGB ICC profile (Display P3 from phones, Adobe RGB,
  CMYK) to sRGB first; an untagged image is shown as sRGB by every browser. Colour described only
  by a HEIF ``nclx`` box is taken as sRGB (the phones we see tag wide gamut with an ICC profile).
* Orientation: the EXIF orientation is applied to the pixels (output width/height are the upright
  ones) and then dropped with the rest of the EXIF. libheif already applies HEIF's own rotation,
  and pillow-heif then reports orientation 1, so nothing is rotated twice.
* Animated GIF/WebP (and AVIF) become animated WebP *and* animated AVIF: Pillow's AVIF plugin
  writes image sequences cleanly. Frame durations are kept, except that durations of 10 ms or
  less become 100 ms, which is how browsers already play them. The loop count is kept in the
  WebP; Pillow's AVIF writer has no loop setting, so the AVIF loops forever. A HEIF file with
  several top-level images is a still image: only its primary image is used.
* AVIF uploads are sniffed as HEIF (same container); they are decoded with Pillow's own AVIF
  plugin (dav1d), because pillow-heif here has no AV1 decoder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import io
import math
import os
import re
import struct
import typing
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import pillow_heif
import simplejpeg
from PIL import AvifImagePlugin, Image, ImageCms, ImageFile, WebPImagePlugin

from pipelines.errors import InvalidInput, MediaError, TooLarge, UnsupportedCodec
from pipelines.placeholder import thumbhash_image
from pipelines.profiles import ImageProfile, Limits, Profiles
from pipelines.results import Output
from pipelines.runner import FORMAT_WHITELIST
from pipelines.sandbox import child_limits, run_isolated, run_isolated_with_stats
from pipelines.sniff import sniff

DAMAGED = "The image is damaged or incomplete and cannot be read."

# Load the readers and both writers once in the worker, so each forked child inherits them instead
# of importing every Pillow plugin again on its first save() (tens of milliseconds per image).
# Registering a plugin does not widen what a file may reach: every open names its one format.
Image.preinit()
if not (AvifImagePlugin.SUPPORTED and WebPImagePlugin.SUPPORTED):
    raise ImportError("this Pillow build cannot write AVIF or WebP")

# Our container name -> the one Pillow plugin allowed to read it.
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "heif": "HEIF", "avif": "AVIF"}
_ANIMATED_FORMATS = {"GIF", "WEBP", "AVIF", "PNG"}  # PNG: APNG; a plain PNG has one frame
_AVIF_BRANDS = {b"avif", b"avis"}
_HEVC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"}

# What a decoder raises on bad bytes. TypeError and AttributeError are left out on purpose: those
# are our bugs, and must not be reported to a user as a damaged file.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, zlib.error)

# The same table as ImageOps.exif_transpose, applied to the already reduced image (cheaper than
# rotating the full-size one) and driven by the orientation decode recorded, so plan and pixels
# cannot disagree.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_VP8X_ALPHA = 0x10
_MAX_TOP_LEVEL_BOXES = 10_000
_MOV = "mov,mp4,m4a,3gp,3g2,mj2"
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt(3) parameters


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc's (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_Convert = typing.Callable[[Image.Image], Image.Image]

# Hamming: Pillow scales every filter's support with the reduction, so this is a proper
# anti-aliased downscale, at the cost of bilinear (110 ms for 12 MP -> 3 MP here, against 180 ms
# for bicubic and 270 ms for Lanczos). Against a Lanczos reference it measured 49-53 dB PSNR on
# our photos; AVIF q60 and WebP q80 themselves stay near 40 dB, so the difference is invisible.
_RESAMPLE = Image.Resampling.HAMMING
# Very large reductions (a 100 MP PNG to 2048 px) first shrink by an integer box step that leaves
# at least 3x for the filter: Pillow's documented "indistinguishable from fair resampling" setting.
_REDUCING_GAP = 3.0
# Below this output size, splitting the resize over two threads costs more than it saves.
_SPLIT_RESIZE_PIXELS = 1_000_000
# lcms' one-pixel cache only helps flat images; photos pay for the check on every pixel.
_CMS_FLAGS = ImageCms.Flags.NOCACHE


@dataclass(frozen=True)
class ImageInfo:
    """What decode learned. ``width``/``height`` are as stored, before orientation is applied."""

    container: str
    mime: str
    width: int
    height: int
    frames: int
    animated: bool
    orientation: int  # EXIF orientation 1..8 (1 when absent)
    mode: str
    has_alpha: bool
    had_metadata: bool  # EXIF/GPS/XMP present in the source


@dataclass(frozen=True)
class ImagePlan:
    """Output size after orientation and resize to the profile's long edge (never upscaled)."""

    width: int
    height: int
    animated: bool
    frames: int


@dataclass(frozen=True)
class ImageEncodeResult:
    outputs: tuple[Output, ...]  # image_avif (image.avif) and image_webp (image.webp)
    peak_rss_bytes: int


# --------------------------------------------------------------------------------------------
# Public stages


def image_decode(src: Path, out_dir: Path, *, limits: Limits) -> ImageInfo:
    """Prove the file decodes completely, within limits, and report what it is.

    Nothing is written to ``out_dir``: encode reads the original again, so no large intermediate
    file has to travel between machines. A HEIF still and a JPEG are proved by their headers (and
    a HEIF's boxes) only: their pixels are decoded once, by encode, which refuses a damaged file
    with the same error.
    """
    container, mime, pil_format = _source_format(src)
    return run_isolated(
        _decode_in_child,
        str(src),
        pil_format,
        container,
        mime,
        limits,
        limits=child_limits(limits, wall_seconds=limits.probe_wall_seconds),
    )


def image_normalize(info: ImageInfo, *, profiles: Profiles) -> ImagePlan:
    """Decide the output size; refuse an animation whose frames would not fit in memory."""
    width, height = _upright_size(info.width, info.height, info.orientation)
    scale = min(1.0, profiles.image.long_edge / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    if info.animated:
        # The encoders take the whole sequence at once, so every reduced frame (4 bytes a pixel)
        # is held in memory; leave the other half of the child's budget to the decoder and the
        # encoders. Refuse here, with a reason, rather than with a MemoryError after minutes of work.
        needed = info.frames * out_w * out_h * 4
        if needed > profiles.limits.memory_bytes // 2:
            message = f"The animation has {info.frames} frames of {out_w}x{out_h} pixels"
            raise TooLarge(
                f"{message}; that is more than we can convert.",
                detail=f"needs about {needed} bytes, limit {profiles.limits.memory_bytes}",
            )
    return ImagePlan(width=out_w, height=out_h, animated=info.animated, frames=info.frames)


def image_encode(
    src: Path, info: ImageInfo, plan: ImagePlan, out_dir: Path, *, profiles: Profiles, limits: Limits
) -> ImageEncodeResult:
    """Write ``image.avif`` and ``image.webp`` into ``out_dir``: upright, resized, metadata-free."""
    # Sniff again rather than trust ``info.container``: the plugin restriction must follow the
    # bytes actually on disk.
    _, _, pil_format = _source_format(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs, stats = run_isolated_with_stats(
        _encode_in_child,
        str(src),
        pil_format,
        info.orientation,
        plan,
        str(out_dir),
        profiles.image,
        limits,
        limits=child_limits(limits),
        reap_in_background=True,
    )
    return ImageEncodeResult(outputs=outputs, peak_rss_bytes=stats.peak_rss_bytes)


# --------------------------------------------------------------------------------------------
# Parent side helpers (read at most a few hundred bytes of the upload)


def _source_format(src: Path) -> tuple[str, str, str]:
    """Return (container, mime, Pillow format) decided from the content alone."""
    sniffed = sniff(src)
    if sniffed.kind != "image":
        raise InvalidInput("The file is not an image.", detail=f"sniffed as {sniffed.container}")
    if sniffed.container == "heif" and _is_avif(src):
        return "avif", "image/avif", "AVIF"
    return sniffed.container, sniffed.mime, _PIL_FORMATS[sniffed.container]


def _is_avif(src: Path) -> bool:
    with open(src, "rb") as fh:
        head = fh.read(256)
    box_end = min(len(head), int.from_bytes(head[:4], "big"))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, box_end - 3, 4)}
    return head[8:12] in _AVIF_BRANDS or bool(brands & _AVIF_BRANDS and not brands & _HEVC_BRANDS)


def _upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------------
# Child side: everything below runs in the forked, rlimited process


def _harden(pil_format: str, limits: Limits) -> None:
    """Set decoder guards; process-wide, which is fine because this process is the child."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; we want a refusal from 1x.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    # Explicit, although it is Pillow's default: refuse truncated files (see module docstring).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if pil_format == "HEIF":
        # Thumbnails off: pillow-heif could otherwise serve a tiny embedded preview from draft().
        pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    _reuse_memory()


def _reuse_memory() -> None:
    """Let this short-lived child reuse the memory it frees instead of mapping fresh pages.

    A forked child starts with no free memory of its own, and every first touch of a page is a
    fault: a 12 MP photo took 57,000 of them, a quarter of its CPU time in the kernel. glibc maps
    each large allocation (image blocks, decoder and encoder buffers) afresh and unmaps it on
    free; kept in the heap instead, what one step frees the next one reuses (the encoders reuse
    the full-size pixels): 43,000 faults, 15-40 ms less CPU a photo. (Pillow's own block cache was
    tried too: it keeps freed blocks from the encoders, which allocate with malloc.) One arena for
    every thread: glibc gives each new thread (the bands, libheif's and the encoders' threads) an
    arena of its own, whose heaps hold no large block, so those were mapped and unmapped as before;
    with one, a 12 MP HEIC took 33,600 faults instead of 50,700 and peaked at 163 MB instead of
    230 MB (a JPEG: 28,400 and 143 MB instead of 33,900 and 165 MB). The child's rlimits still apply."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _LIBC.mallopt(_M_ARENA_MAX, 1)


@contextmanager
def _decoder_errors(limits: Limits) -> Iterator[None]:
    """Turn what a decoder raises on hostile bytes into errors a person can read."""
    try:
        yield
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(str(exc), limits) from None
    except _DECODER_ERRORS as exc:
        if "Decompressed data too large" in str(exc):
            # PNG text chunk that inflates to huge sizes: a bomb, not a damaged file.
            raise TooLarge(
                "The image contains compressed data that expands beyond what we accept.",
                detail=str(exc),
            ) from None
        raise InvalidInput(DAMAGED, detail=f"{type(exc).__name__}: {exc}") from None
    except RuntimeError as exc:
        # Pillow's AVIF plugin reports libavif's failures ("Failed to decode frame 0: Decoding of
        # color planes failed", a grid or gain map it cannot build) as RuntimeError: the file's.
        if "decod" not in str(exc).lower():
            raise
        raise InvalidInput(DAMAGED, detail=f"{type(exc).__name__}: {exc}") from None


def _megapixels(pixels: int) -> str:
    mp = pixels / 1_000_000
    return f"{mp:,.0f} megapixels" if mp >= 100 else f"{mp:.3g} megapixels"


def _pixels_error(pixels: int, limits: Limits) -> TooLarge:
    return TooLarge(
        f"The image is {_megapixels(pixels)}; the limit is {_megapixels(limits.max_image_pixels)}.",
        detail=f"{pixels} pixels > max_image_pixels={limits.max_image_pixels}",
    )


def _bomb_error(message: str, limits: Limits) -> TooLarge:
    found = re.search(r"\((\d+) pixels\)", message)
    if found:
        return _pixels_error(int(found.group(1)), limits)
    limit = _megapixels(limits.max_image_pixels)
    return TooLarge(f"The image is larger than the limit of {limit}.", detail=message)


def _check_container(path: str, pil_format: str) -> None:
    """Refuse an ISOBMFF (HEIF/AVIF) file that ends inside one of its boxes.

    libheif decodes a grid image with missing tiles "successfully" (they come out green), so a
    truncated phone photo would otherwise pass as valid.
    """
    if pil_format not in ("HEIF", "AVIF"):
        return
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as fh:
        # Real files have a handful of top-level boxes; do not let millions of tiny ones cost time.
        for _ in range(_MAX_TOP_LEVEL_BOXES):
            if pos + 8 > size:
                break
            fh.seek(pos)
            header = fh.read(16)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1 and len(header) == 16:
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:  # "extends to the end of the file"
                return
            if box_size < 8:
                raise InvalidInput(DAMAGED, detail=f"box {box_type!r} at {pos} has size {box_size}")
            pos += box_size
    if pos > size:
        raise InvalidInput(DAMAGED, detail=f"the file ends {pos - size} bytes before its last box does")


def _open(src: str, pil_format: str, limits: Limits) -> Image.Image:
    """Open with the one allowed plugin; a HEIF image sequence without a primary image (``moov``
    but no ``meta`` box) is its first picture, as a viewer shows it."""
    if pil_format == "HEIF" and _sequence_without_primary(src):
        return _first_sequence_picture(src, limits)
    return Image.open(src, formats=[pil_format])


def _top_level_boxes(path: str) -> Iterator[bytes]:
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as fh:
        for _ in range(_MAX_TOP_LEVEL_BOXES):
            if pos + 8 > size:
                return
            fh.seek(pos)
            header = fh.read(16)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            yield box_type
            if box_size == 1 and len(header) == 16:
                box_size = int.from_bytes(header[8:16], "big")
            if box_size < 8:  # 0: to the end of the file; less: damaged (_check_container says so)
                return
            pos += box_size


def _sequence_without_primary(path: str) -> bool:
    boxes = set(_top_level_boxes(path))
    return b"moov" in boxes and b"meta" not in boxes


def _first_sequence_picture(path: str, limits: Limits) -> Image.Image:
    """The first picture of a HEIF image sequence (``msf1``: an HEVC track in a ``moov``), decoded
    by PyAV's HEVC decoder with the same fd-only, allow-listed demuxer the video probe uses."""
    options = {"protocol_whitelist": "fd", "format_whitelist": FORMAT_WHITELIST}
    try:
        with open(path, "rb") as fh, av.open(fh, "r", format=_MOV, container_options=options) as ct:
            if not ct.streams.video:
                raise InvalidInput("The image sequence holds no picture.")
            stream = ct.streams.video[0]
            cc = stream.codec_context
            if cc.codec.canonical_name != "hevc":
                raise UnsupportedCodec(f"Image sequences in {cc.codec.canonical_name} are not supported.")
            if cc.width * cc.height > limits.max_image_pixels:
                raise _pixels_error(cc.width * cc.height, limits)
            for frame in ct.decode(stream):
                return _frame_to_rgb(frame)
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError) as exc:
        raise InvalidInput(DAMAGED, detail=f"{type(exc).__name__}: {exc}") from None
    raise InvalidInput(DAMAGED, detail="no picture decoded from the image sequence")


def _frame_to_rgb(frame: av.VideoFrame) -> Image.Image:
    # The frame's own matrix and range; HEVC without a colour description is BT.601 limited.
    full = int(frame.color_range or 0) == 2
    rgb = frame.reformat(format="rgb24", src_color_range="JPEG" if full else "MPEG", dst_color_range="JPEG")
    return typing.cast(Image.Image, rgb.to_image())  # type: ignore[no-untyped-call]


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODER_ERRORS:
        return 1  # unreadable EXIF: show the pixels as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _had_metadata(im: Image.Image) -> bool:
    # EXIF (which holds GPS), XMP, and IPTC (JPEG's "photoshop" block): what can identify a person.
    if any(im.info.get(key) for key in ("exif", "xmp", "XML:com.adobe.xmp", "photoshop")):
        return True
    try:
        return len(im.getexif()) > 0
    except _DECODER_ERRORS:
        return True  # something is there, even if broken


def _frame_count(im: Image.Image, pil_format: str) -> int:
    # HEIF "frames" are independent top-level images (bursts, edits); we use the primary only.
    return int(getattr(im, "n_frames", 1)) if pil_format in _ANIMATED_FORMATS else 1


def _check_size(im: Image.Image, pil_format: str, limits: Limits) -> int:
    """Check pixels and frames from the header, before any pixel is decoded; return frames."""
    width, height = im.size
    if width * height > limits.max_image_pixels:
        raise _pixels_error(width * height, limits)
    frames = _frame_count(im, pil_format)
    if frames > limits.max_animation_frames:
        raise TooLarge(
            f"The animation has {frames} frames; the limit is {limits.max_animation_frames} frames.",
            detail=f"n_frames={frames}",
        )
    return frames


def _refuse_file_references(im: Image.Image) -> None:
    """Refuse a PNG text chunk named ``profile``: ImageMagick reads the file it names into its
    output (CVE-2022-44268). We would not, but such a file is an attack, not a photo, and a
    downstream tool that trusts our upload store might."""
    text = getattr(im, "text", None) or {}
    if any(key.strip().lower() == "profile" for key in text):
        raise InvalidInput(
            "The image contains an embedded file reference (a known attack) and was refused.",
            detail=f"PNG text keywords: {sorted(text)[:10]}",
        )


def _decode_in_child(src: str, pil_format: str, container: str, mime: str, limits: Limits) -> ImageInfo:
    _harden(pil_format, limits)
    _check_container(src, pil_format)
    with _decoder_errors(limits), _open(src, pil_format, limits) as im:
        width, height = im.size
        frames = _check_size(im, pil_format, limits)
        mode = im.mode
        has_alpha = False
        if pil_format == "JPEG":
            # Encode entropy-decodes every coefficient of every scan anyway (a DCT-scaled decode
            # too), under the same guards: a truncated JPEG is refused there, with the same
            # words. Proving it here first cost 15-20 ms of a 12 MP photo's time (a 1/8 decode).
            # The header gives size, mode, orientation and metadata; a JPEG has no alpha.
            pass
        elif pil_format == "HEIF" and not _sequence_without_primary(src):
            # HEVC tiles cost 300+ ms to decode; encode decodes them (under the same guards), so
            # here the header, the pixel limit and the container (_check_container: libheif
            # paints missing tiles green instead of failing) are the proof.
            has_alpha = im.has_transparency_data
        else:
            for index in range(frames):
                im.seek(index)
                im.load()
                has_alpha = has_alpha or im.has_transparency_data
        # Only after loading: a PNG's EXIF may sit after its pixels, and reading it first would
        # load the pixels inside _orientation's error guard, hiding a truncated file.
        orientation = _orientation(im)
        had_metadata = _had_metadata(im)
        _refuse_file_references(im)
    return ImageInfo(
        container=container,
        mime=mime,
        width=width,
        height=height,
        frames=frames,
        animated=frames > 1,
        orientation=orientation,
        mode=mode,
        has_alpha=has_alpha,
        had_metadata=had_metadata,
    )


def _encode_in_child(
    src: str,
    pil_format: str,
    orientation: int,
    plan: ImagePlan,
    out_dir: str,
    profile: ImageProfile,
    limits: Limits,
) -> tuple[Output, ...]:
    _harden(pil_format, limits)
    _check_container(src, pil_format)
    # The size before orientation is applied: we resize first and rotate the small image.
    target = _upright_size(plan.width, plan.height, orientation)
    # Only reading sits under _decoder_errors: an encoder failure is our problem, not a damaged file.
    with _decoder_errors(limits):
        im = _open(src, pil_format, limits)
    with im, ThreadPoolExecutor(max_workers=2) as pool:
        with _decoder_errors(limits):
            frames = _check_size(im, pil_format, limits)
            loop = _loop_count(im, pil_format)
            # Parsing the ICC profile and building the transform (3-4 ms) needs no pixels: it runs on
            # the other core while turbo decodes (into RGBX) on this one.
            turbo = pil_format == "JPEG" and im.mode == "RGB"
            early = pool.submit(_srgb_converter, "RGBX", im.info.get("icc_profile")) if turbo else None
            scaled = _jpeg_scaled(src, im, target) if pil_format == "JPEG" else None
            if pil_format == "JPEG" and scaled is None:
                # Pillow can only scale by 1/2, 1/4 or 1/8, and only while the result still
                # covers the target (see _jpeg_scaled).
                im.draft(None, target)
            rows = _heif_rows(im, target) if pil_format == "HEIF" and not plan.animated else None
        pictures: list[Image.Image] = []
        durations: list[int] = []
        for index in range(min(frames, plan.frames) if plan.animated else 1):
            if scaled is None and rows is None:
                with _decoder_errors(limits):
                    im.seek(index)
                    im.load()
            durations.append(_duration(im))
            picture: Image.Image | _Rows = scaled if scaled is not None else rows or _to_working_mode(im)
            if early is not None and picture.mode == "RGBX":
                to_srgb = early.result()
            else:
                to_srgb = _srgb_converter(picture.mode, im.info.get("icc_profile"))
            if isinstance(picture, Image.Image) and plan.animated:
                picture = _transpose(to_srgb(_resize(picture, target)), orientation)
            else:
                picture = _resize_convert_turn(picture, target, to_srgb, orientation, pool)
            # Detach from the file object, which the next seek() overwrites in place.
            pictures.append(picture.copy() if picture is im else picture)
        if not plan.animated:
            # The full-size pixels are done with: free them, for the encoders' buffers to reuse.
            im.close()
            scaled = rows = None
            _drop_heif_pixels(im)
        pictures = _same_mode(pictures)
        # The page's placeholder, from the picture about to be written (the store used to decode
        # the written WebP again for it: 10-50 ms). Runs beside the encoders; it only reads.
        placeholder = pool.submit(thumbhash_image, pictures[0])
        # Both encoders release the GIL, so they run side by side. Image.save() keeps per-call
        # state on the image object, hence the AVIF writer gets its own first frame: an Image of
        # its own over the same pixels (neither writer changes them), not a 12 MB copy.
        avif = pool.submit(
            _write_avif, [_same_pixels(pictures[0]), *pictures[1:]], durations, Path(out_dir) / "image.avif", profile
        )
        webp = _write_webp(pictures, durations, loop, Path(out_dir) / "image.webp", profile)
        return (avif.result(), dataclasses.replace(webp, placeholder=placeholder.result()))


# ---- pixels


def _jpeg_scaled(src: str, im: Image.Image, target: tuple[int, int]) -> Image.Image | None:
    """Decode a JPEG with libjpeg-turbo scaling in the DCT by the smallest M/8 that still covers
    ``target``: a phone's 4032x3024 decodes at 5/8 (2520x1890), then a small resize.

    Pillow's ``draft`` offers only 1/2, 1/4 and 1/8; for 4032 px to 2048 that means full size
    (1/2 falls 1.6 % short, and making that up by an upscale cost 0.4 % SSIM and 3-4 % of the
    bytes). At 5/8 there are 2.6 times fewer pixels to decode and to resample: 90 ms less CPU for
    a 12 MP photo, SSIM within 0.1 % and bytes within 0.5 % of a full-size decode.

    Pillow has already parsed the headers (size, EXIF, ICC profile, which we keep using); turbo
    writes its pixels straight into a buffer that Pillow then reads in place (``RGBX``, Pillow's own
    four-byte layout for RGB). ``None`` (Pillow decodes) for CMYK, which turbo does not convert.
    """
    if im.mode not in ("RGB", "L"):
        return None
    with open(src, "rb") as fh:
        data = fh.read()
    colorspace, mode, depth = ("RGBX", "RGBX", 4) if im.mode == "RGB" else ("GRAY", "L", 1)
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data, min_height=target[1], min_width=target[0])
        pixels = bytearray(width * height * depth)
        simplejpeg.decode_jpeg(data, colorspace, min_height=target[1], min_width=target[0], buffer=pixels)
    except ValueError:
        # simplejpeg stops at warnings Pillow passes over (stray bytes before a marker, a short
        # APP segment), even when not strict: let Pillow decode such a file, as it always has.
        return None
    del data
    return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)


@dataclass(frozen=True)
class _Rows:
    """Decoded pixels still in the decoder's buffer: ``size[1]`` rows of ``stride`` bytes of
    ``mode``. Pillow keeps RGB in four bytes a pixel, so an Image of them is always a copy; this
    lets each band copy only the rows it reads (``image``), on its own thread."""

    mode: str
    size: tuple[int, int]
    stride: int
    data: memoryview

    def image(self, first: int, last: int) -> Image.Image:
        rows = typing.cast(bytes, self.data[first * self.stride : last * self.stride])  # any buffer will do
        return Image.frombuffer(self.mode, (self.size[0], last - first), rows, "raw", self.mode, self.stride, 1)


def _heif_rows(im: Image.Image, target: tuple[int, int]) -> _Rows | None:
    """Decode a HEIF still into pillow-heif's buffer and hand it out as ``_Rows``, instead of
    ``im.load()``, which copies all 12 MP into Pillow's image (36 MB, 30 ms on one core, before
    the bands can start) only for the bands to read them once.

    ``None`` (load as usual) for what the bands would not split or would premultiply (alpha,
    grey, 16 bits), for a picture that needs a box reduction first, and for a pillow-heif whose
    plugin keeps its file elsewhere. A damaged file raises here what ``im.load()`` would."""
    heif = getattr(im, "_heif_file", None)
    if not isinstance(heif, pillow_heif.HeifFile) or im.mode != "RGB":
        return None
    picture = heif[im.tell()]
    width, height = im.size
    small = target[0] * target[1] < _SPLIT_RESIZE_PIXELS
    if small or int(min(width / target[0], height / target[1]) / _REDUCING_GAP) > 1:
        return None
    data = picture.data  # decodes (libheif, on its own threads)
    if picture.mode != "RGB" or picture.size != im.size:
        return None
    return _Rows(mode="RGB", size=(width, height), stride=picture.stride, data=memoryview(data))


def _drop_heif_pixels(im: Image.Image) -> None:
    """Let go of pillow-heif's decoded buffer (``_heif_rows``) once the bands have read it, so
    the encoders reuse its memory; its plugin frees it itself only after a ``load()``."""
    if isinstance(getattr(im, "_heif_file", None), pillow_heif.HeifFile):
        im._heif_file = None  # type: ignore[attr-defined]


def _same_pixels(im: Image.Image) -> Image.Image:
    """Another Image object over the same pixels (no copy), for a second writer to save from."""
    return im._new(im.im)


def _to_working_mode(im: Image.Image) -> Image.Image:
    """Bring any decoded mode to one that resamples correctly: L, LA, RGB, RGBA or CMYK."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG): Pillow's convert() would clip everything above 255 to white.
        return im.convert("I").point(lambda v: v / 256).convert("L")
    if im.has_transparency_data:
        return im if mode in ("RGBA", "LA") else im.convert("RGBA")
    if mode in ("L", "RGB"):
        return im
    if mode == "CMYK" and im.info.get("icc_profile"):
        return im  # converted through its own profile in _to_srgb
    return im.convert("RGB")


def _resize_convert_turn(
    im: Image.Image | _Rows, size: tuple[int, int], to_srgb: _Convert, orientation: int, pool: ThreadPoolExecutor
) -> Image.Image:
    """Resize, convert to sRGB (after the resize: a quarter of the pixels) and turn upright, in two
    horizontal bands on two threads: resampling, lcms and transpose all release the GIL. Each band
    is resized from its own box of the source (the filter still reads across the band edge), so
    the pixels are those of one whole resize, to rounding; each band is turned on its own thread
    (the rotation of a whole 3 MP picture cost 16 ms on one core) and pasted where it lands.

    ``im`` may be decoded pixels Pillow has not copied yet (``_Rows``): each band then copies only
    the source rows its filter reads, on its own thread."""
    if isinstance(im, _Rows):
        rows: _Rows | None = im
        mode, (width, height) = im.mode, im.size
    else:
        rows, mode, (width, height) = None, im.mode, im.size
        if size[0] * size[1] < _SPLIT_RESIZE_PIXELS:
            return _transpose(to_srgb(_resize(im, size)), orientation)
    # Alpha is premultiplied once here, as Image.resize would do, rather than once per band.
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(mode)
    source: Image.Image | None = None
    if isinstance(im, Image.Image):
        source = im.convert(premultiplied) if premultiplied else im
        factor = int(min(width / size[0], height / size[1]) / _REDUCING_GAP)
        if factor > 1:
            source = source.reduce(factor)  # what reducing_gap does inside Image.resize
        width, height = source.size
    half = size[1] // 2
    scale = height / size[1]
    spans = [(0, half), (half, size[1])]

    def band(span: tuple[int, int]) -> Image.Image:
        top, bottom = span[0] * scale, span[1] * scale
        if rows is not None:
            # The rows the filter reads: its support (1 for Hamming) times the reduction, and one
            # for Pillow's rounding of each window's ends.
            reach = math.ceil(max(scale, 1.0)) + 1
            first, last = max(0, math.floor(top) - reach), min(height, math.ceil(bottom) + reach)
            picture, top, bottom = rows.image(first, last), top - first, bottom - first
        else:
            assert source is not None
            picture = source
        out = picture.resize((size[0], span[1] - span[0]), _RESAMPLE, box=(0, top, width, bottom))
        return _transpose(to_srgb(out.convert(mode) if premultiplied else out), orientation)

    bands = list(pool.map(band, spans))
    out = Image.new(bands[0].mode, _upright_size(*size, orientation))
    for part, span in zip(bands, spans, strict=True):
        out.paste(part, _turned_origin(size, span, orientation))
    return out


def _turned_origin(size: tuple[int, int], rows: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Where the band ``rows`` of a ``size`` picture starts once the picture is turned by
    ``orientation`` (the same turn as ``_TRANSPOSE``): its two corners mapped, the smaller x and y."""
    width, height = size
    (x0, y0), (x1, y1) = [_turned_point(x, y, width, height, orientation) for x, y in ((0, rows[0]), (width, rows[1]))]
    return min(x0, x1), min(y0, y1)


def _turned_point(x: int, y: int, width: int, height: int, orientation: int) -> tuple[int, int]:
    turned = {
        2: (width - x, y),  # mirrored left to right
        3: (width - x, height - y),  # 180 degrees
        4: (x, height - y),  # mirrored top to bottom
        5: (y, x),  # transposed
        6: (height - y, x),  # 90 degrees clockwise
        7: (height - y, width - x),  # transversed
        8: (y, width - x),  # 90 degrees counter-clockwise
    }
    return turned.get(orientation, (x, y))


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    return im.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _srgb_converter(mode: str, icc: bytes | None) -> _Convert:
    """``_to_srgb`` for images of ``mode``, with the profile parsed and the transform built once
    (the bands of one picture share it)."""
    if mode in ("L", "LA") or not icc:
        return lambda im: _to_srgb(im, None)
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if mode != "CMYK" and "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
            return lambda im: im
        # RGBX: a JPEG that turbo decoded (_jpeg_scaled); lcms refuses a transform built for another mode.
        in_mode = mode if mode in ("CMYK", "RGBX") else "RGB"
        transform = ImageCms.buildTransform(source, _SRGB, in_mode, "RGB", flags=_CMS_FLAGS)
    except (ImageCms.PyCMSError, OSError, ValueError):
        # A broken profile is not a broken image: show the pixels as sRGB.
        return lambda im: _to_srgb(im, None)

    def convert(im: Image.Image) -> Image.Image:
        alpha = im.getchannel("A") if im.mode == "RGBA" else None
        rgb = im.convert("RGB") if alpha is not None else im
        try:
            converted = ImageCms.applyTransform(rgb, transform)
        except (ImageCms.PyCMSError, OSError, ValueError):
            return _to_srgb(im, None)
        assert converted is not None
        if alpha is not None:
            converted.putalpha(alpha)
        return converted

    return convert


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert through the embedded ICC profile to sRGB, so the profile can be dropped."""
    if im.mode in ("L", "LA"):
        return im.convert("RGBA" if im.mode == "LA" else "RGB")
    if not icc:
        return im.convert("RGB") if im.mode == "CMYK" else im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode != "CMYK" and "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
            return im
        alpha = im.getchannel("A") if im.mode == "RGBA" else None
        rgb = im.convert("RGB") if alpha is not None else im
        converted = ImageCms.profileToProfile(rgb, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        # A broken profile is not a broken image: show the pixels as sRGB.
        return im.convert("RGB") if im.mode == "CMYK" else im
    assert converted is not None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def _same_mode(pictures: list[Image.Image]) -> list[Image.Image]:
    """One mode for every frame (the AVIF sequence needs it); drop an alpha that is fully opaque."""
    mode = "RGBA" if any(p.mode == "RGBA" and not _opaque(p) for p in pictures) else "RGB"
    for index, picture in enumerate(pictures):
        # In place, so a long animation is never held twice.
        pictures[index] = picture if picture.mode == mode else picture.convert(mode)
        pictures[index].info = {}  # nothing of the source travels: no EXIF, XMP, ICC, comment
    return pictures


def _opaque(im: Image.Image) -> bool:
    low, _ = typing.cast(tuple[int, int], im.getchannel("A").getextrema())
    return low == 255


# ---- animation timing


def _duration(im: Image.Image) -> int:
    value = im.info.get("duration") or 0
    # Browsers play GIF frames of 10 ms or less at 100 ms; keep what people actually saw.
    return 100 if value <= 10 else int(value)


def _loop_count(im: Image.Image, pil_format: str) -> int:
    """WebP loop count (0 = forever, n = play n times) from the source's own notion of loops."""
    loop = im.info.get("loop")
    if pil_format != "GIF":
        return int(loop or 0)
    if loop is None:
        return 1  # a GIF without the NETSCAPE extension plays once
    # The NETSCAPE count is the number of *repeats* after the first play; 0 is forever.
    return 0 if loop == 0 else int(loop) + 1


# ---- writers


def _write_avif(
    pictures: list[Image.Image],
    durations: list[int],
    path: Path,
    profile: ImageProfile,
) -> Output:
    first, rest = pictures[0], pictures[1:]
    # Empty exif/xmp/icc_profile explicitly: the AVIF writer falls back to im.info otherwise.
    options: dict[str, object] = {
        "quality": profile.avif_quality,
        "speed": profile.avif_speed,
        # Two: the WebP encoder runs beside this one and ends first (~80 against ~120 ms of CPU
        # for a 12 MP photo); with one thread, the second core then idled while AVIF finished.
        # Same bytes (libavif's automatic tiling depends on the size, not on the threads).
        "max_threads": 2,
        "exif": b"",
        "xmp": b"",
        "icc_profile": b"",
    }
    if rest:
        options.update(save_all=True, append_images=rest, duration=durations)
    first.save(path, "AVIF", **options)
    return _output("image_avif", path, "image/avif", "av1", first, durations if rest else None)


def _write_webp(
    pictures: list[Image.Image], durations: list[int], loop: int, path: Path, profile: ImageProfile
) -> Output:
    first, rest = pictures[0], pictures[1:]
    options: dict[str, object] = {
        "quality": profile.webp_quality,
        "method": profile.webp_method,
        "exif": b"",
        "xmp": b"",
        "icc_profile": b"",
    }
    if rest:
        options.update(save_all=True, append_images=rest, duration=durations, loop=loop)
    first.save(path, "WEBP", **options)
    if rest and first.mode == "RGBA":
        _mark_webp_alpha(path)
    return _output("image_webp", path, "image/webp", "webp", first, durations if rest else None)


def _mark_webp_alpha(path: Path) -> None:
    """Set the VP8X alpha flag of an animated WebP whose frames have transparency.

    libwebp's animation encoder crops a fully transparent border off the first frame and then
    leaves the flag unset, although the uncovered canvas is transparent. Readers that trust the
    flag (Pillow among them) would show that border black.
    """
    with open(path, "r+b") as fh:
        header = fh.read(21)
        if header[12:16] == b"VP8X" and not header[20] & _VP8X_ALPHA:
            fh.seek(20)
            fh.write(bytes([header[20] | _VP8X_ALPHA]))


def _output(
    role: str, path: Path, content_type: str, codec: str, first: Image.Image, durations: list[int] | None
) -> Output:
    return Output(
        role=role,
        file=path.name,  # relative: the caller renames out_dir after we return
        content_type=content_type,
        codec=codec,
        width=first.width,
        height=first.height,
        duration=sum(durations) / 1000 if durations else None,
        bytes=path.stat().st_size,
    )
