"""ThumbHash placeholders: ~25 bytes that a page paints as a blurred picture (with the right
colours and aspect) until the real image or poster has loaded, as Immich does.

The algorithm is Evan Wallace's ThumbHash (public domain): the picture, at most 100x100,
turned into luminance / yellow-blue / red-green / alpha channels, a few DCT terms of each,
quantised into 4-bit nibbles behind a 5-byte header. Pure Python on a picture first shrunk to
at most ``SIDE`` px a side: a few ms, and no dependency beyond Pillow.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

from PIL import Image

SIDE = 32  # encoding more pixels changes the few DCT terms kept by less than their quantisation


def thumbhash_file(path: Path) -> str:
    """The base64 ThumbHash of an image file (any format Pillow opens)."""
    with Image.open(path) as img:
        img.draft("RGB", (SIDE * 4, SIDE * 4))  # JPEG: decode at a fraction of the size
        rgba = img.convert("RGBA")
    return thumbhash_image(rgba)


def thumbhash_image(img: Image.Image) -> str:
    """The base64 ThumbHash of an RGB or RGBA picture in memory, which is left as it is.

    The image encode hashes the picture it is about to write: for a 12 MP photo that is ~1 ms
    against 30-50 ms to decode the written WebP again (the placeholder is 32 px of blur; what
    lossy encoding changes does not reach it).
    """
    factor = max(1, max(img.size) // (SIDE * 4))
    small = img.reduce(factor) if factor > 1 else img.copy()
    small.thumbnail((SIDE, SIDE), Image.Resampling.BOX)
    rgba = small if small.mode == "RGBA" else small.convert("RGBA")
    return base64.b64encode(rgba_to_thumbhash(rgba.width, rgba.height, rgba.tobytes())).decode("ascii")


def rgba_to_thumbhash(w: int, h: int, rgba: bytes) -> bytes:
    """Encode ``w`` x ``h`` RGBA pixels (each side at most 100)."""
    if w > 100 or h > 100 or w < 1 or h < 1:
        raise ValueError(f"{w}x{h} does not fit in 100x100")
    n = w * h
    avg_r = avg_g = avg_b = avg_a = 0.0
    for i in range(n):
        alpha = rgba[4 * i + 3] / 255
        avg_r += alpha / 255 * rgba[4 * i]
        avg_g += alpha / 255 * rgba[4 * i + 1]
        avg_b += alpha / 255 * rgba[4 * i + 2]
        avg_a += alpha
    if avg_a:
        avg_r, avg_g, avg_b = avg_r / avg_a, avg_g / avg_a, avg_b / avg_a
    has_alpha = avg_a < n
    l_limit = 5 if has_alpha else 7
    lx = max(1, round(l_limit * w / max(w, h)))
    ly = max(1, round(l_limit * h / max(w, h)))
    lum, p, q, a = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    for i in range(n):
        alpha = rgba[4 * i + 3] / 255
        r = avg_r * (1 - alpha) + alpha / 255 * rgba[4 * i]
        g = avg_g * (1 - alpha) + alpha / 255 * rgba[4 * i + 1]
        b = avg_b * (1 - alpha) + alpha / 255 * rgba[4 * i + 2]
        lum[i] = (r + g + b) / 3
        p[i] = (r + g) / 2 - b
        q[i] = r - g
        a[i] = alpha

    def encode_channel(channel: list[float], nx: int, ny: int) -> tuple[float, list[float], float]:
        dc, ac, scale = 0.0, [], 0.0
        for cy in range(ny):
            cx = 0
            fy = [math.cos(math.pi / h * cy * (y + 0.5)) for y in range(h)]
            while cx * ny < nx * (ny - cy):
                fx = [math.cos(math.pi / w * cx * (x + 0.5)) for x in range(w)]
                f = 0.0
                for y in range(h):
                    row, fyy = y * w, fy[y]
                    f += fyy * sum(channel[row + x] * fx[x] for x in range(w))
                f /= n
                if cx or cy:
                    ac.append(f)
                    scale = max(scale, abs(f))
                else:
                    dc = f
                cx += 1
        if scale:
            ac = [0.5 + 0.5 / scale * v for v in ac]
        return dc, ac, scale

    l_dc, l_ac, l_scale = encode_channel(lum, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = encode_channel(p, 3, 3)
    q_dc, q_ac, q_scale = encode_channel(q, 3, 3)
    a_dc, a_ac, a_scale = encode_channel(a, 5, 5) if has_alpha else (1.0, [], 1.0)

    landscape = w > h
    header24 = (
        round(63 * l_dc)
        | (round(31.5 + 31.5 * p_dc) << 6)
        | (round(31.5 + 31.5 * q_dc) << 12)
        | (round(31 * l_scale) << 18)
        | (int(has_alpha) << 23)
    )
    header16 = (
        (ly if landscape else lx) | (round(63 * p_scale) << 3) | (round(63 * q_scale) << 9) | (int(landscape) << 15)
    )
    out = [header24 & 255, (header24 >> 8) & 255, header24 >> 16, header16 & 255, header16 >> 8]
    if has_alpha:
        out.append(round(15 * a_dc) | (round(15 * a_scale) << 4))
    nibbles = [round(15 * f) for ac in ([l_ac, p_ac, q_ac, a_ac] if has_alpha else [l_ac, p_ac, q_ac]) for f in ac]
    for i in range(0, len(nibbles), 2):
        out.append(nibbles[i] | ((nibbles[i + 1] if i + 1 < len(nibbles) else 0) << 4))
    return bytes(out)


def thumbhash_to_rgba(hash_: bytes) -> tuple[int, int, bytes]:
    """Decode to a small RGBA picture (32 px on its long side), as the page's script does."""
    header24 = hash_[0] | (hash_[1] << 8) | (hash_[2] << 16)
    header16 = hash_[3] | (hash_[4] << 8)
    l_dc = (header24 & 63) / 63
    p_dc = ((header24 >> 6) & 63) / 31.5 - 1
    q_dc = ((header24 >> 12) & 63) / 31.5 - 1
    l_scale = ((header24 >> 18) & 31) / 31
    has_alpha = bool(header24 >> 23)
    p_scale = ((header16 >> 3) & 63) / 63
    q_scale = ((header16 >> 9) & 63) / 63
    landscape = bool(header16 >> 15)
    lx = max(3, (5 if has_alpha else 7) if landscape else header16 & 7)
    ly = max(3, header16 & 7 if landscape else (5 if has_alpha else 7))
    a_dc = (hash_[5] & 15) / 15 if has_alpha else 1.0
    a_scale = (hash_[5] >> 4) / 15
    ac_start = 6 if has_alpha else 5
    index = 0

    def decode_channel(nx: int, ny: int, scale: float) -> list[float]:
        nonlocal index
        ac = []
        for cy in range(ny):
            cx = 0 if cy else 1
            while cx * ny < nx * (ny - cy):
                nibble = (hash_[ac_start + (index >> 1)] >> ((index & 1) << 2)) & 15
                ac.append((nibble / 7.5 - 1) * scale)
                index += 1
                cx += 1
        return ac

    l_ac = decode_channel(lx, ly, l_scale)
    p_ac = decode_channel(3, 3, p_scale * 1.25)
    q_ac = decode_channel(3, 3, q_scale * 1.25)
    a_ac = decode_channel(5, 5, a_scale) if has_alpha else []
    ratio = aspect_ratio(hash_)
    w = round(32 if ratio > 1 else 32 * ratio)
    h = round(32 / ratio if ratio > 1 else 32)
    pixels = bytearray(w * h * 4)
    for y in range(h):
        for x in range(w):
            lum, p, q, a = l_dc, p_dc, q_dc, a_dc
            fx = [math.cos(math.pi / w * (x + 0.5) * cx) for cx in range(max(lx, 5 if has_alpha else 3))]
            fy = [math.cos(math.pi / h * (y + 0.5) * cy) for cy in range(max(ly, 5 if has_alpha else 3))]
            j = 0
            for cy in range(ly):
                cx, fy2 = (0 if cy else 1), fy[cy] * 2
                while cx * ly < lx * (ly - cy):
                    lum += l_ac[j] * fx[cx] * fy2
                    j += 1
                    cx += 1
            j = 0
            for cy in range(3):
                cx, fy2 = (0 if cy else 1), fy[cy] * 2
                while cx < 3 - cy:
                    f = fx[cx] * fy2
                    p += p_ac[j] * f
                    q += q_ac[j] * f
                    j += 1
                    cx += 1
            if has_alpha:
                j = 0
                for cy in range(5):
                    cx, fy2 = (0 if cy else 1), fy[cy] * 2
                    while cx < 5 - cy:
                        a += a_ac[j] * fx[cx] * fy2
                        j += 1
                        cx += 1
            b = lum - 2 / 3 * p
            r = (3 * lum - b + q) / 2
            g = r - q
            i = 4 * (y * w + x)
            pixels[i : i + 4] = bytes(int(max(0.0, 255 * min(1.0, v))) for v in (r, g, b, a))  # as Uint8Array stores it
    return w, h, bytes(pixels)


def aspect_ratio(hash_: bytes) -> float:
    """Width / height, as the hash approximates it."""
    header = hash_[3]
    has_alpha = hash_[2] & 0x80
    landscape = hash_[4] & 0x80
    lx = (5 if has_alpha else 7) if landscape else header & 7
    ly = header & 7 if landscape else (5 if has_alpha else 7)
    return lx / ly
