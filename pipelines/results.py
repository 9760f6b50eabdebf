"""Stage results: frozen dataclasses that round-trip through JSON.

A stage's result is written next to its files as ``result.json``; the next stage (maybe on
another machine, maybe after a redelivery) reads it back with ``from_json``. So results hold
only primitives, nested result dataclasses, tuples of those and optionals, and file names
relative to the stage's own directory (the directory is renamed into place after the stage).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, Union

T = TypeVar("T")


@dataclass(frozen=True)
class Output:
    """One deliverable file, as the store stage records it (a rendition)."""

    role: str  # video, audio, image_avif, image_webp, thumbnail, manifest, segment
    file: str  # relative to the stage directory that produced it
    content_type: str
    codec: str = ""
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    bytes: int = 0
    placeholder: str = ""  # base64 ThumbHash, when the stage that wrote the file made it


def to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj


def from_json(cls: type[T], data: Any) -> T:
    return typing.cast(T, _convert(cls, data))


def _convert(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(members[0], data) if len(members) == 1 else data
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in data)
        return tuple(_convert(a, v) for a, v in zip(args, data, strict=True))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_convert(arg, v) for v in data]
    if origin is dict:
        _, val = typing.get_args(tp)
        return {k: _convert(val, v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data}
        return tp(**kwargs)
    return data
