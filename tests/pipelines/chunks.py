"""Split-and-stitch in process, as the chunk tasks and the audio task do it on the hosts: each
chunk encoded into a folder of its own, then the audio; the tests join and check them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipelines import chunked


def encode_chunks(
    dm: Any,
    plan: Any,
    filters: Any,
    chunks: chunked.ChunkPlan,
    tmp_path: Path,
    *,
    profiles: Any,
    limits: Any,
    ranges: Iterable[Any] | None = None,
) -> tuple[list[tuple[Path, Any]], Any]:
    """(the part's file, its result) for each of ``ranges`` (all, in order, unless given: hosts
    take them in any order), and the audio task's result; the demux is in ``tmp_path/demux``."""
    parts = []
    for rng in chunks.ranges if ranges is None else ranges:
        out = tmp_path / f"part{rng.index}"
        part = chunked.encode_part(dm, tmp_path / "demux", filters, plan, chunks, rng.index, out,
                                   profiles=profiles, limits=limits)  # fmt: skip
        parts.append((out / part.file, part))
    audio = chunked.encode_audio(dm, tmp_path / "demux", filters, plan, tmp_path / "audio", profiles=profiles,
                                 limits=limits)  # fmt: skip
    return parts, audio
