"""Stage directories: where a stage's files live between tasks, and why a rerun can skip.

A stage's files are the truth in *storage*, under ``work/<item>/<stage>/`` (local storage by
default, S3 in production), so the next stage may run on any worker host: no host relies on
another host's disk. ``WORK_ROOT/<item>/<stage>`` is this host's cache of them.

Each stage writes into a fresh temporary directory. When it is done, its files (with its
``result.json``) are written through to storage under a folder of that delivery's own, then
``done.json`` naming that folder, last: a stage counts as done once ``done.json`` is in
storage, so a half-written stage is never seen as done, and two deliveries racing never mix
their files (the last ``done.json`` names one whole set). Then the temporary directory is
renamed into the local cache (atomic). A host that lacks a stage's files (after a hop, or a
restart) fetches them from storage into a temporary directory and renames it into place.
On local storage on the same disk the write-through is a hard link: no bytes are copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage

from pipelines.results import from_json, to_json

logger = logging.getLogger("tasks.workspace")

T = TypeVar("T")
RESULT_FILE = "result.json"
DONE_FILE = "done.json"
WORK_PREFIX = "work"


def item_dir(item_id: Any) -> Path:
    return Path(settings.WORK_ROOT) / str(item_id)


def stage_dir(item_id: Any, stage: str) -> Path:
    return item_dir(item_id) / stage


def stored_prefix(item_id: Any, stage: str | None = None) -> str:
    return f"{WORK_PREFIX}/{item_id}" + (f"/{stage}" if stage else "")


def stage_done(item_id: Any, stage: str) -> bool:
    """Done here (cached) or in storage (by any host)."""
    if (stage_dir(item_id, stage) / RESULT_FILE).exists():
        return True
    return bool(default_storage.exists(f"{stored_prefix(item_id, stage)}/{DONE_FILE}"))


def new_tmp_dir(item_id: Any, stage: str) -> Path:
    path = item_dir(item_id) / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def commit_stage(item_id: Any, stage: str, tmp: Path, result: Any) -> int:
    """Write the stage's files and result through to storage, then into this host's cache.

    Returns the bytes written to storage (0 when another delivery had already committed: the
    first result stands, and ours is dropped)."""
    (tmp / RESULT_FILE).write_text(json.dumps(to_json(result), indent=1))
    prefix = stored_prefix(item_id, stage)
    moved = 0
    if not default_storage.exists(f"{prefix}/{DONE_FILE}"):
        delivery = uuid.uuid4().hex[:12]
        for path in sorted(_files(tmp)):
            moved += _put(path, f"{prefix}/{delivery}/{path.relative_to(tmp).as_posix()}")
        done = tmp.parent / f".{stage}.done-{delivery}"
        done.write_text(json.dumps({"delivery": delivery}))
        try:
            moved += _put(done, f"{prefix}/{DONE_FILE}")  # last: the stage is done from here on
        finally:
            done.unlink(missing_ok=True)
    final = stage_dir(item_id, stage)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another delivery of the same stage finished first on this host; its result stands.
        if not (final / RESULT_FILE).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return moved


def local_stage(item_id: Any, stage: str) -> Path:
    """The stage's folder on this host, fetched from storage first if this host lacks it."""
    final = stage_dir(item_id, stage)
    if (final / RESULT_FILE).exists():
        return final
    prefix = stored_prefix(item_id, stage)
    try:
        with default_storage.open(f"{prefix}/{DONE_FILE}", "rb") as fh:
            prefix = f"{prefix}/{json.loads(fh.read())['delivery']}"
    except FileNotFoundError:
        raise FileNotFoundError(f"stage {stage} of item {item_id} is not done, here or in storage") from None
    tmp = new_tmp_dir(item_id, f"{stage}-fetch")
    fetched = 0
    try:
        for key in _stored_files(prefix):
            target = tmp / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with default_storage.open(key, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            fetched += target.stat().st_size
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / RESULT_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(json.dumps({"item": str(item_id), "stage": stage, "fetched_bytes": fetched}))
    return final


def load_result(item_id: Any, stage: str, cls: type[T]) -> T:
    data = json.loads((local_stage(item_id, stage) / RESULT_FILE).read_text())
    return from_json(cls, data)


def clear(item_id: Any) -> None:
    """Remove the item's work files on this host (its cache)."""
    shutil.rmtree(item_dir(item_id), ignore_errors=True)


def clear_tmp(item_id: Any) -> None:
    base = item_dir(item_id)
    if base.exists():
        for child in base.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def _stored_files(prefix: str) -> Iterator[str]:
    try:
        dirs, files = default_storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        yield f"{prefix}/{name}"
    for name in dirs:
        yield from _stored_files(f"{prefix}/{name}")


def _put(path: Path, key: str) -> int:
    """Store ``path`` under ``key`` (replacing it); returns the bytes copied (0 for a hard link)."""
    try:
        target = Path(default_storage.path(key))
    except NotImplementedError:
        if default_storage.exists(key):
            default_storage.delete(key)
        with open(path, "rb") as fh:
            default_storage.save(key, File(fh, name=key))
        return path.stat().st_size
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        os.link(path, tmp)
        copied = 0
    except OSError:  # another filesystem: copy
        shutil.copyfile(path, tmp)
        copied = path.stat().st_size
    tmp.replace(target)
    return copied
