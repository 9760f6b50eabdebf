"""The S3 path against a real S3-compatible server (moto in server mode, over HTTP, not mocked).

The Django side runs in-process (test client, ``settings`` pointing default storage at the moto
bucket); the bytes go over real HTTP: the client PUTs to S3's presigned URL, django-storages and
boto3 talk to moto, download URLs are fetched with ``requests``. The session-wide uvicorn and
worker keep local storage, so the last test runs the processing chain in this process (Celery
eager mode) instead of in the worker.
"""

from __future__ import annotations

import io
import os
from urllib.parse import urlparse

import pytest
import requests
from django.core.files.storage import default_storage

from media_app.models import MediaItem, MediaStatus
from media_app.services import media_item_create, renditions_replace
from tests.media_app.test_api_support import HTML_AS_MP4, create, error_of
from tests.states import set_state

pytest_plugins = ["tests.s3", "tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("api_isolation")]

TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}


def _create_and_put(client, s3_storage, data: bytes, *, name: str = "clip.mp4"):
    created = create(client, name=name, size=len(data))
    assert created.status_code == 201, created.content
    body = created.json()
    url = urlparse(body["upload"]["url"])
    assert f"{url.scheme}://{url.netloc}" == s3_storage.server.url
    assert "Signature=" in url.query and url.path == f"/{s3_storage.name}/uploads/{body['id']}/source"
    stored = requests.put(body["upload"]["url"], data=data, timeout=30)
    assert stored.status_code == 200, stored.text
    return body


def test_presigned_put_goes_straight_to_the_bucket_and_complete_enqueues_once(
    api, clip, s3_storage, sent, django_capture_on_commit_callbacks
):
    client, _ = api()
    data = clip.read_bytes()
    body = _create_and_put(client, s3_storage, data)
    assert s3_storage.get(f"uploads/{body['id']}/source") == data

    with django_capture_on_commit_callbacks(execute=True):
        first = client.post(f"/api/media/{body['id']}/complete")
        second = client.post(f"/api/media/{body['id']}/complete")
    assert first.status_code == second.status_code == 202
    assert len(sent.for_item(body["id"])) == 1
    assert MediaItem.objects.get(pk=body["id"]).detected_content_type == "video/mp4"


def test_complete_refuses_a_wrong_size_or_type_and_drops_the_object(
    api, clip, s3_storage, sent, django_capture_on_commit_callbacks
):
    client, _ = api()
    data = clip.read_bytes()
    body = create(client, size=len(data)).json()
    # S3 cannot cap a presigned PUT's size: complete checks it.
    assert requests.put(body["upload"]["url"], data=data[:-10], timeout=30).status_code == 200
    short = client.post(f"/api/media/{body['id']}/complete")
    assert short.status_code == 400 and error_of(short)["code"] == "size_mismatch"
    assert s3_storage.keys("uploads/") == []

    page = _create_and_put(client, s3_storage, HTML_AS_MP4, name="page.mp4")
    with django_capture_on_commit_callbacks(execute=True):
        refused = client.post(f"/api/media/{page['id']}/complete")
    assert refused.status_code == 415
    assert error_of(refused)["message"] == "The file is not a video, audio or image file we can read."
    assert MediaItem.objects.get(pk=page["id"]).status == MediaStatus.FAILED
    assert s3_storage.keys("uploads/") == []
    assert sent.tasks == []


def test_tus_on_s3_keeps_a_short_upload_in_a_tail_object_then_one_put(
    api, clip, s3_storage, sent, settings, django_capture_on_commit_callbacks
):
    """Below S3's 5 MiB part floor no multipart upload is started: the bytes so far wait in a
    tail object in the bucket (where any web process finds them), and the last PATCH PUTs the file."""
    client, _ = api()
    data = clip.read_bytes()
    assert len(data) < 5 * 1024**2
    created = client.post("/api/tus/", HTTP_UPLOAD_LENGTH=str(len(data)), **TUS)
    url = created["Location"]
    item_id = url.rsplit("/", 1)[1]
    half = len(data) // 2
    chunk = {"content_type": "application/offset+octet-stream"}
    assert client.generic("PATCH", url, data[:half], HTTP_UPLOAD_OFFSET="0", **chunk, **TUS).status_code == 204
    assert s3_storage.keys() == [f"uploads/{item_id}/source.tail-0"]
    assert s3_storage.get(f"uploads/{item_id}/source.tail-0") == data[:half]
    assert not settings.UPLOAD_STAGING_DIR.exists() or not any(settings.UPLOAD_STAGING_DIR.iterdir())
    with django_capture_on_commit_callbacks(execute=True):
        last = client.generic("PATCH", url, data[half:], HTTP_UPLOAD_OFFSET=str(half), **chunk, **TUS)
    assert last.status_code == 204
    assert s3_storage.keys() == [f"uploads/{item_id}/source"]
    assert s3_storage.get(f"uploads/{item_id}/source") == data
    assert s3_storage.client.list_multipart_uploads(Bucket=s3_storage.name).get("Uploads", []) == []
    assert len(sent.for_item(item_id)) == 1


def test_download_urls_are_s3_presigned_gets_that_serve_ranges(api, s3_storage):
    client, user = api()
    data = os.urandom(5000)
    item = media_item_create(owner=user, original_name="song.flac", size=len(data))
    key = f"outputs/{item.pk}/audio.webm"
    default_storage.save(key, io.BytesIO(data))
    renditions_replace(
        item_id=item.pk,
        renditions=[{"role": "audio", "storage_key": key, "content_type": "audio/webm", "bytes": len(data)}],
    )
    set_state(item_id=item.pk, status=MediaStatus.COMPLETED)
    [out] = client.get(f"/api/media/{item.pk}").json()["outputs"]
    assert out["url"].startswith(f"{s3_storage.server.url}/{s3_storage.name}/{key}?")
    whole = requests.get(out["url"], timeout=30)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Content-Type"] == "audio/webm"
    assert 'filename="song.webm"' in whole.headers["Content-Disposition"]
    part = requests.get(out["url"], headers={"Range": "bytes=10-19"}, timeout=30)
    assert part.status_code == 206 and part.content == data[10:20]


def test_delete_removes_the_objects_from_the_bucket(api, clip, s3_storage, sent):
    client, _ = api()
    body = _create_and_put(client, s3_storage, clip.read_bytes())
    default_storage.save(f"outputs/{body['id']}/video.webm", io.BytesIO(b"webm"))
    assert len(s3_storage.keys()) == 2
    assert client.delete(f"/api/media/{body['id']}").status_code == 204
    assert s3_storage.keys() == []


def test_an_s3_upload_is_processed_to_completed_with_outputs_in_the_bucket(
    api, clip, s3_storage, sent, settings, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    from config.celery import app
    from tasks.stages import process

    settings.WORK_ROOT = tmp_path / "work"
    client, _ = api()
    body = _create_and_put(client, s3_storage, clip.read_bytes())
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/api/media/{body['id']}/complete").status_code == 202
    [(name, args, task_id)] = sent.for_item(body["id"])

    # What the worker would do with that message, here, against the same bucket.
    monkeypatch.setattr(app.conf, "task_always_eager", True)
    assert name == process.name
    process.apply(args=args, task_id=task_id)

    item = MediaItem.objects.get(pk=body["id"])
    assert item.status == MediaStatus.COMPLETED, (item.error_code, item.error_message, item.error_detail[-2000:])
    outputs = s3_storage.keys(f"outputs/{item.pk}/")
    assert outputs and any(k.endswith(".webm") for k in outputs)
    detail = client.get(f"/api/media/{item.pk}").json()
    video = next(o for o in detail["outputs"] if o["content_type"].startswith("video/"))
    assert requests.get(video["url"], timeout=30).content[:4] == b"\x1a\x45\xdf\xa3"
