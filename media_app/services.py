"""Writes other than an item's state: its bytes, its outputs, its files in storage.

The item's state (status, stage, progress, errors, queueing) is ``media_app.lifecycle``'s alone;
what is here creates items, stores bytes and outputs, and removes files.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction

from media_app import lifecycle
from media_app.lifecycle import ErrorReport, item_group, owner_group
from media_app.models import MediaItem, Rendition

__all__ = ["ErrorReport", "item_group", "owner_group"]

logger = logging.getLogger(__name__)


def source_key_for(item_id: Any) -> str:
    # Generated, never derived from the uploaded name: no traversal, no collisions.
    return f"uploads/{item_id}/source"


def output_key_for(item_id: Any, name: str) -> str:
    return f"outputs/{item_id}/{name}"


def media_item_create(*, owner: Any, original_name: str, size: int = 0, declared_content_type: str = "") -> MediaItem:
    return lifecycle.created(
        owner=owner,
        original_name=original_name[:1024],
        size=size,
        declared_content_type=declared_content_type[:255],
        source_key=source_key_for,
    )


def media_item_store_source(*, item: MediaItem, fileobj: IO[bytes]) -> MediaItem:
    """Stream ``fileobj`` into storage under the item's generated key (replacing any earlier bytes)."""
    if default_storage.exists(item.source_key):
        default_storage.delete(item.source_key)
    saved = default_storage.save(item.source_key, File(fileobj))
    item.source_key = saved
    item.size = default_storage.size(saved)
    item.save(update_fields=["source_key", "size", "updated_at"])
    return item


def media_processing_start(
    *, item: MediaItem, kind: str = "", content_type: str = "", info: dict[str, Any] | None = None
) -> bool:
    """The upload is finished: queue its processing once, sent after the transaction commits.
    False if it was already finished or queued (of two concurrent completes, one wins).
    ``info``: what was learnt from the bytes (the sniff), so the worker does not learn it again."""
    return lifecycle.finish_upload_and_queue(item_id=item.pk, kind=kind, content_type=content_type, info=info)


def renditions_replace(*, item_id: Any, renditions: Iterable[dict[str, Any]]) -> list[Rendition]:
    """Replace an item's outputs in one transaction, so a rerun never leaves two sets."""
    with transaction.atomic():
        # The item's row lock orders two deliveries of ``store``: under READ COMMITTED the second
        # one's DELETE would not see the rows the first just inserted, and its INSERT would clash.
        MediaItem.objects.select_for_update().filter(pk=item_id).first()
        Rendition.objects.filter(item_id=item_id).delete()
        return [Rendition.objects.create(item_id=item_id, **r) for r in renditions]


def rendition_put(*, item_id: Any, rendition: dict[str, Any]) -> Rendition:
    """Record one output ahead of the others (the thumbnail, while the encode runs), replacing
    any of the same role; ``renditions_replace`` later writes the whole set."""
    with transaction.atomic():
        MediaItem.objects.select_for_update().filter(pk=item_id).first()
        Rendition.objects.filter(item_id=item_id, role=rendition["role"]).delete()
        return Rendition.objects.create(item_id=item_id, **rendition)


def storage_delete_tree(prefix: str) -> None:
    """Delete every stored object under ``prefix``: on disk the folder at once (an item's stage
    files are a dozen, deleted after every item), on S3 object by object (it has no folders)."""
    try:
        path = default_storage.path(prefix)
    except NotImplementedError:
        path = None
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        dirs, files = default_storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        default_storage.delete(f"{prefix}/{name}")
    for name in dirs:
        storage_delete_tree(f"{prefix}/{name}")


def media_item_remove_files(item: MediaItem, *, source: bool) -> None:
    """Remove an item's outputs and stage files (and with ``source`` its upload) from storage,
    and this host's cache of its stage files (other hosts' caches go with the cleanup job)."""
    keys = set(item.renditions.values_list("storage_key", flat=True))
    prefixes = [f"outputs/{item.pk}", f"work/{item.pk}"]
    if source:
        keys.add(item.source_key)
        prefixes.append(f"uploads/{item.pk}")
    for key in keys - {""}:
        default_storage.delete(key)
    for prefix in prefixes:
        storage_delete_tree(prefix)
    Rendition.objects.filter(item=item).delete()
    shutil.rmtree(Path(settings.WORK_ROOT) / str(item.pk), ignore_errors=True)
