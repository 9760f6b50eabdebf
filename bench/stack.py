"""The whole stack from the outside: create an item, enqueue it, wait for the worker to finish it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from django.utils import timezone

FINAL = ("Completed", "Failed")


def user(name: str) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get_or_create(username=name)[0]


def create(path: Path, owner: Any) -> Any:
    """An item whose source is stored, as after an upload, not yet queued."""
    from media_app.services import media_item_create, media_item_store_source

    item = media_item_create(owner=owner, original_name=path.name, size=path.stat().st_size)
    with open(path, "rb") as fh:
        media_item_store_source(item=item, fileobj=fh)
    return item


def enqueue(item: Any) -> datetime:
    """Queue the item's chain; returns the enqueue time (the clock every item timestamp uses)."""
    from media_app.services import media_processing_start

    t0 = timezone.now()
    media_processing_start(item=item)
    return t0


def wait(ids: list[Any], *, timeout: float, interval: float = 0.1) -> list[Any]:
    from media_app.models import MediaItem

    deadline = time.monotonic() + timeout
    while True:
        done = MediaItem.objects.filter(pk__in=ids, status__in=FINAL).count()
        if done == len(ids):
            items = {str(i.pk): i for i in MediaItem.objects.filter(pk__in=ids)}
            return [items[str(i)] for i in ids]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - done} of {len(ids)} items not finished after {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Run:
    """One item through the worker: wall time from enqueue to Completed, and where it went."""

    item: Any
    seconds: float
    stages: dict[str, float]

    @property
    def media_seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def overhead_seconds(self) -> float:
        """Queue waits, task hand-offs, status saves and broadcasts: everything but the stages' work."""
        return self.seconds - self.media_seconds


def process(path: Path, owner: Any, *, timeout: float = 1800) -> Run:
    item = create(path, owner)
    t0 = enqueue(item)
    (item,) = wait([item.pk], timeout=timeout)
    if item.status != "Completed":
        raise RuntimeError(f"{path.name} ended {item.status}: {item.error_code} {item.error_message}")
    return Run(item=item, seconds=(item.finished_at - t0).total_seconds(), stages=dict(item.timings))


def output_path(item: Any, role: str) -> Path:
    from django.core.files.storage import default_storage

    rendition = item.renditions.get(role=role)
    return Path(default_storage.path(rendition.storage_key))
