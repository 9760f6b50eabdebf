"""The thumbnail shows while the video is still encoding (issue 15): taken right after demux and
stored at once, so the page has a picture within seconds of processing starting."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import requests
from PIL import Image
from rest_framework.authtoken.models import Token

from media_app.models import MediaItem
from media_app.services import media_processing_start
from pipelines.av import PreviewResult
from tasks import workspace
from tests.conftest import wait_for
from tests.media import lavfi_video, source_frame, ssim

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_the_thumbnail_downloads_while_the_item_is_still_encoding(
    asgi_server, celery_worker, make_item, make_user, tmp_path: Path
) -> None:
    owner = make_user()
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=owner)[0].key}"}
    src = lavfi_video(tmp_path / "clip.mp4", seconds=12, size="640x360")
    item = make_item(src, owner=owner)
    media_processing_start(item=item)

    def encoding() -> bool:
        fresh = MediaItem.objects.get(pk=item.pk)
        assert fresh.status in ("Pending", "Processing"), (fresh.status, fresh.error_message)
        return fresh.status == "Processing" and fresh.stage == "encode"

    wait_for(encoding, timeout=90, what="the encode to start")
    detail = requests.get(f"{asgi_server.url}/api/media/{item.pk}", headers=auth).json()

    assert detail["status"] == "Processing" and detail["stage"] == "encode", detail
    (thumb,) = [o for o in detail["outputs"] if o["role"] == "thumbnail"]
    got = requests.get(thumb["url"])
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/webp"
    with Image.open(io.BytesIO(got.content)) as img:
        assert img.format == "WEBP" and img.size == (thumb["width"], thumb["height"]) == (640, 360)
        picture = img.convert("RGB")
    at = workspace.load_result(item.pk, "previews", PreviewResult).at
    assert at is not None
    assert ssim(picture, source_frame(src, at)) >= 0.85

    final = wait_for(
        lambda: MediaItem.objects.filter(pk=item.pk, status__in=("Completed", "Failed")).first(),
        timeout=180,
        what="the item to finish",
    )
    assert final.status == "Completed", (final.error_code, final.error_message)
    # One set of outputs at the end: the early thumbnail was replaced, not doubled.
    roles = list(final.renditions.exclude(role="segment").values_list("role", flat=True))
    assert sorted(roles) == ["manifest", "storyboard", "storyboard_vtt", "thumbnail", "video"]
