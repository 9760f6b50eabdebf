"""One upload is sniffed once and probed once: at complete and in the entry task, never again.

The whole chain runs in this process (eagerly, as ``manage.py process`` runs it) with counters
around the sniff and probe functions every module calls, counting calls on the upload itself.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage

from media_app import jobs
from media_app.models import MediaItem
from media_app.uploads import upload_complete
from tests.media import lavfi_video

pytestmark = pytest.mark.django_db


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Calls of sniff and probe on any file named ``source`` (where the upload is stored)."""
    import media_app.uploads
    import pipelines.av
    import pipelines.detect
    import pipelines.images

    calls: Counter[str] = Counter()

    def wrap(module: Any, name: str, what: str, on_upload: Any) -> None:
        real = getattr(module, name)

        def counting(*args: Any, **kwargs: Any) -> Any:
            if on_upload(args):
                calls[what] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    is_source = lambda args: Path(args[0]).name == "source"  # noqa: E731
    for module in (pipelines.detect, pipelines.av, pipelines.images):
        if hasattr(module, "sniff"):
            wrap(module, "sniff", "sniff", is_source)
        if hasattr(module, "probe"):
            wrap(module, "probe", "probe", is_source)
    wrap(media_app.uploads, "sniff_bytes", "sniff", lambda args: True)
    return calls


def test_a_video_upload_is_sniffed_once_and_probed_once(
    make_item, tmp_storage, tmp_path, counted, settings, monkeypatch
):
    from config.celery import app
    from tasks.stages import process

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(app.conf, "task_always_eager", True)
    monkeypatch.setattr(jobs, "send", lambda *a, **k: None)  # this test runs the entry task itself
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=2))
    MediaItem.objects.filter(pk=item.pk).update(size=default_storage.size(item.source_key))

    upload_complete(item=MediaItem.objects.get(pk=item.pk))
    item.refresh_from_db()
    process.apply(args=[str(item.pk)], task_id=item.task_id)

    item.refresh_from_db()
    assert item.status == "Completed", item.error_message
    assert item.media_info["probe"]["streams"], "the probe's findings are kept on the item"
    assert dict(counted) == {"sniff": 1, "probe": 1}
