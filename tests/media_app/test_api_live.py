"""The presigned-PUT flow over real HTTP against the live ASGI server, then the real worker."""

from __future__ import annotations

import pytest
import requests
from django.core.files.storage import default_storage
from rest_framework.authtoken.models import Token

from media_app.models import FINAL_STATUSES, MediaItem
from tests.conftest import wait_for

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = pytest.mark.django_db(transaction=True)


def test_presigned_put_on_local_storage_ends_completed_with_downloadable_outputs(asgi_server, make_user, clip, request):
    key = Token.objects.get_or_create(user=make_user())[0].key
    auth = {"Authorization": f"Token {key}"}
    data = clip.read_bytes()
    created = requests.post(
        f"{asgi_server.url}/api/media/",
        json={"file_name": "clip.mp4", "size": len(data), "content_type": "video/mp4"},
        headers=auth,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["upload"]["url"].startswith(f"{asgi_server.url}/api/uploads/")

    stored = requests.put(body["upload"]["url"], data=data)  # no credentials: the URL is the grant
    assert stored.status_code == 200, stored.text
    item = MediaItem.objects.get(pk=body["id"])
    with default_storage.open(item.source_key, "rb") as fh:
        assert fh.read() == data

    complete = requests.post(body["upload"]["complete_url"], headers=auth)
    again = requests.post(body["upload"]["complete_url"], headers=auth)
    assert complete.status_code == again.status_code == 202

    request.getfixturevalue("celery_worker")
    final = wait_for(
        lambda: MediaItem.objects.filter(pk=body["id"], status__in=FINAL_STATUSES).first(),
        timeout=180,
        what="the uploaded clip to finish processing",
    )
    assert final.status == "Completed", (final.error_code, final.error_message)

    detail = requests.get(f"{asgi_server.url}/api/media/{body['id']}", headers=auth).json()
    video = next(o for o in detail["outputs"] if o["content_type"].startswith("video/"))
    whole = requests.get(video["url"])
    assert whole.status_code == 200 and whole.headers["Content-Type"] == video["content_type"]
    assert len(whole.content) == video["bytes"]
    part = requests.get(video["url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == whole.content[:100]
    assert whole.content[:4] == b"\x1a\x45\xdf\xa3"  # WebM (EBML)
