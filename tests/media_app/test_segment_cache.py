"""DASH serving: one signed token per folder, Range, content types, and a TTL cache in Redis.

Storage is a FileSystemStorage that counts its opens, so "served from the cache" means the
storage was not read again, not merely that the bytes matched.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from django.core.cache import caches
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage
from django.test import Client, RequestFactory

from media_app.api.signing import dash_url, download_url
from tests.states import set_state

pytestmark = pytest.mark.django_db


class CountingStorage(FileSystemStorage):
    opened: list[str] = []

    def _open(self, name: str, mode: str = "rb") -> Any:
        CountingStorage.opened.append(name)
        return super()._open(name, mode)


@pytest.fixture
def storage(tmp_path: Path, settings: Any) -> FileSystemStorage:
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": f"{__name__}.CountingStorage",
            "OPTIONS": {"location": str(tmp_path / "storage"), "base_url": "/media/"},
        },
    }
    CountingStorage.opened = []
    caches["segments"].clear()
    return default_storage


def folder(storage: Any, files: dict[str, bytes]) -> str:
    prefix = f"outputs/{uuid.uuid4()}/dash/"
    for name, data in files.items():
        storage.save(prefix + name, ContentFile(data))
    return prefix


def path_of(url: str) -> str:
    return urlsplit(url).path


def test_a_second_range_request_for_a_segment_is_served_from_the_cache(storage):
    segment = os.urandom(300_000)
    prefix = folder(storage, {"manifest.mpd": b"<MPD/>", "chunk-0-00001.webm": segment})
    manifest, _ = dash_url(RequestFactory().get("/"), manifest_key=prefix + "manifest.mpd", version="v1")
    url = urljoin(manifest, "chunk-0-00001.webm")  # what dash.js does with the manifest's names
    key = prefix + "chunk-0-00001.webm"
    client = Client()

    first = client.get(path_of(url), HTTP_RANGE="bytes=1000-1999")
    assert first.status_code == 206
    assert first["X-Segment-Cache"] == "miss"
    assert first.content == segment[1000:2000]
    assert first["Content-Range"] == f"bytes 1000-1999/{len(segment)}"
    assert first["Content-Type"] == "video/webm"
    assert CountingStorage.opened == [key]

    second = client.get(path_of(url), HTTP_RANGE="bytes=1000-1999")
    assert second.status_code == 206
    assert second["X-Segment-Cache"] == "hit"
    assert second.content == first.content
    # Another range and the whole file: still no second read of the storage.
    tail = client.get(path_of(url), HTTP_RANGE="bytes=-500")
    assert tail.status_code == 206 and tail.content == segment[-500:]
    whole = client.get(path_of(url))
    assert whole.status_code == 200 and whole.content == segment and whole["Accept-Ranges"] == "bytes"
    assert CountingStorage.opened == [key]

    # Gone from storage, still served until the TTL ends.
    storage.delete(key)
    again = client.get(path_of(url), HTTP_RANGE="bytes=1000-1999")
    assert again.status_code == 206 and again.content == segment[1000:2000]


def test_the_cache_entry_expires_after_its_ttl(storage, settings):
    settings.MEDIA_SEGMENT_CACHE_SECONDS = 1
    prefix = folder(storage, {"init-0.webm": b"init bytes"})
    manifest, _ = dash_url(RequestFactory().get("/"), manifest_key=prefix + "manifest.mpd", version="v1")
    url = path_of(urljoin(manifest, "init-0.webm"))
    client = Client()
    assert client.get(url)["X-Segment-Cache"] == "miss"
    assert client.get(url)["X-Segment-Cache"] == "hit"
    time.sleep(1.3)
    assert client.get(url)["X-Segment-Cache"] == "miss"
    assert len(CountingStorage.opened) == 2


def test_a_new_version_of_the_outputs_is_not_served_from_an_old_cache_entry(storage):
    prefix = folder(storage, {"chunk-0-00001.webm": b"first run"})
    request = RequestFactory().get("/")
    old, _ = dash_url(request, manifest_key=prefix + "manifest.mpd", version="run-1")
    client = Client()
    assert client.get(path_of(urljoin(old, "chunk-0-00001.webm"))).content == b"first run"
    storage.delete(prefix + "chunk-0-00001.webm")
    storage.save(prefix + "chunk-0-00001.webm", ContentFile(b"second run"))
    new, _ = dash_url(request, manifest_key=prefix + "manifest.mpd", version="run-2")
    assert client.get(path_of(urljoin(new, "chunk-0-00001.webm"))).content == b"second run"


def test_manifest_type_and_refusals(storage, settings):
    prefix = folder(storage, {"manifest.mpd": b"<MPD/>"})
    manifest, _ = dash_url(RequestFactory().get("/"), manifest_key=prefix + "manifest.mpd", version="v1")
    client = Client()
    response = client.get(path_of(manifest))
    assert response.status_code == 200 and response["Content-Type"] == "application/dash+xml"
    assert response["X-Content-Type-Options"] == "nosniff"
    token = path_of(manifest).split("/")[3]
    # Only plain names inside the granted folder; an altered token; a missing file; a bad range.
    assert client.get(f"/api/dash/{token}/..%2Fsource").status_code == 404
    assert client.get(f"/api/dash/{token}/.hidden").status_code == 404
    assert client.get(f"/api/dash/{token[:-2]}xx/manifest.mpd").status_code == 403
    assert client.get(f"/api/dash/{token}/chunk-9-00001.webm").status_code == 404
    assert client.get(path_of(manifest), HTTP_RANGE="bytes=999-").status_code == 416
    settings.DOWNLOAD_URL_EXPIRY_SECONDS = -1
    expired, _ = dash_url(RequestFactory().get("/"), manifest_key=prefix + "manifest.mpd", version="v1")
    refused = client.get(path_of(expired))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "url_expired"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("manifest.mpd", "application/dash+xml"),
        ("media.webm", "video/webm"),
        ("image.avif", "image/avif"),
        ("image.webp", "image/webp"),
    ],
)
def test_downloads_carry_the_type_of_their_extension_when_stored_without_one(storage, name, expected):
    key = f"outputs/{uuid.uuid4()}/{name}"
    storage.save(key, ContentFile(b"bytes"))
    url, _ = download_url(RequestFactory().get("/"), key=key, content_type="", file_name=name)
    response = Client().get(path_of(url), HTTP_RANGE="bytes=0-1")
    assert response.status_code == 206
    assert response["Content-Type"] == expected
    assert response["X-Content-Type-Options"] == "nosniff"


def test_the_item_detail_gives_a_manifest_url_whose_relative_segments_play(storage, make_user):
    from media_app.models import MediaStatus
    from media_app.services import media_item_create, output_key_for, renditions_replace

    user = make_user()
    item = media_item_create(owner=user, original_name="clip.mp4", size=10)
    segment = os.urandom(5000)
    prefix = folder(storage, {"manifest.mpd": b"<MPD/>", "chunk-0-00001.webm": segment})
    assert prefix.startswith("outputs/")
    key = prefix + "manifest.mpd"
    renditions_replace(
        item_id=item.pk,
        renditions=[
            {"role": "manifest", "storage_key": key, "content_type": "application/dash+xml", "bytes": 6},
            {"role": "segment", "storage_key": prefix + "chunk-0-00001.webm", "content_type": "video/webm"},
            {"role": "video", "storage_key": output_key_for(item.pk, "media.webm"), "content_type": "video/webm"},
        ],
    )
    set_state(item_id=item.pk, status=MediaStatus.COMPLETED)
    client = Client()
    client.force_login(user)
    outputs = {o["role"]: o for o in client.get(f"/api/media/{item.pk}").json()["outputs"]}
    assert "segment" not in outputs
    assert path_of(outputs["manifest"]["url"]).startswith("/api/dash/")
    assert path_of(outputs["video"]["url"]).startswith("/api/files/")
    anonymous = Client()  # the signed URL is the credential, as a media element fetches it
    assert anonymous.get(path_of(outputs["manifest"]["url"])).content == b"<MPD/>"
    assert anonymous.get(path_of(urljoin(outputs["manifest"]["url"], "chunk-0-00001.webm"))).content == segment
