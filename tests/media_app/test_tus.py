"""tus 1.0 in-process: every protocol rule the server must keep, answered by the Django test client.

The reference client (``tuspy``) against the live ASGI server is in test_tus_live.py.
"""

from __future__ import annotations

import base64
import datetime as dt

import pytest
import redis
from django.core.files.storage import default_storage
from rest_framework.test import APIClient

from media_app import uploads
from media_app.models import MediaItem, MediaStatus
from media_app.uploads import upload_lock_name, uploads_expire
from tests.media_app.test_api_support import HTML_AS_MP4, create, error_of, put

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("local_storage")]

TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}
CHUNK = "application/offset+octet-stream"


def _meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def _create(client: APIClient, size: int, *, name: str = "clip.mp4", body: bytes = b"") -> tuple[str, object]:
    extra = {"HTTP_UPLOAD_LENGTH": str(size), "HTTP_UPLOAD_METADATA": _meta(filename=name, filetype="video/mp4")}
    if body:
        response = client.generic("POST", "/api/tus/", body, content_type=CHUNK, **TUS, **extra)
    else:
        response = client.post("/api/tus/", **TUS, **extra)
    assert response.status_code == 201, response.content
    return response["Location"], response


def _patch(client: APIClient, url: str, offset: int, data: bytes, content_type: str = CHUNK):
    return client.generic("PATCH", url, data, content_type=content_type, HTTP_UPLOAD_OFFSET=str(offset), **TUS)


def test_options_advertises_version_extensions_and_max_size_without_login(settings):
    settings.UPLOAD_MAX_BYTES = 123456
    response = APIClient().options("/api/tus/")
    assert response.status_code == 204
    assert response["Tus-Resumable"] == "1.0.0" and response["Tus-Version"] == "1.0.0"
    assert set(response["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "expiration",
    }
    assert response["Tus-Max-Size"] == "123456"


def test_every_answer_carries_tus_resumable_even_errors(api):
    anonymous = APIClient().post("/api/tus/", HTTP_UPLOAD_LENGTH="10", **TUS)
    assert anonymous.status_code == 401 and anonymous["Tus-Resumable"] == "1.0.0"
    client, _ = api()
    missing = client.post("/api/tus/", HTTP_UPLOAD_LENGTH="10")
    assert missing.status_code == 412 and missing["Tus-Version"] == "1.0.0"
    assert error_of(missing)["code"] == "tus_version"
    unknown = client.head("/api/tus/00000000-0000-0000-0000-000000000000", **TUS)
    assert unknown.status_code == 404 and unknown["Tus-Resumable"] == "1.0.0"
    assert "Upload-Offset" not in unknown


def test_chunks_resume_from_the_server_offset_and_the_last_one_completes(
    api, clip, sent, settings, django_capture_on_commit_callbacks
):
    client, _ = api()
    data = clip.read_bytes()
    url, created = _create(client, len(data), name="holiday.mp4")
    assert "Upload-Expires" in created
    item = MediaItem.objects.get(pk=url.rsplit("/", 1)[1])
    assert (item.original_name, item.declared_content_type, item.size) == ("holiday.mp4", "video/mp4", len(data))

    head = client.head(url, **TUS)
    assert (head.status_code, head["Upload-Offset"], head["Upload-Length"]) == (200, "0", str(len(data)))
    assert head["Cache-Control"] == "no-store"

    third = len(data) // 3
    first = _patch(client, url, 0, data[:third])
    assert first.status_code == 204 and first["Upload-Offset"] == str(third)
    assert "Upload-Expires" in first
    # The chunk is in storage itself, where any web process can append the next one.
    assert default_storage.open(item.source_key).read() == data[:third]
    assert not settings.UPLOAD_STAGING_DIR.exists() or not any(settings.UPLOAD_STAGING_DIR.iterdir())

    # A client that lost the answer retries from 0: refused with the offset to resume from.
    stale = _patch(client, url, 0, data[:third])
    assert stale.status_code == 409
    assert error_of(stale)["message"] == f"The upload is at byte {third}, not 0; resume from {third}."
    assert client.head(url, **TUS)["Upload-Offset"] == str(third)

    assert _patch(client, url, third, data[third : 2 * third])["Upload-Offset"] == str(2 * third)
    with django_capture_on_commit_callbacks(execute=True):
        last = _patch(client, url, 2 * third, data[2 * third :])
    assert last.status_code == 204 and last["Upload-Offset"] == str(len(data))
    assert "Upload-Expires" not in last

    item.refresh_from_db()
    assert default_storage.open(item.source_key).read() == data
    assert item.task_id and len(sent.for_item(item.pk)) == 1
    # Done: HEAD says so, and "complete" again changes nothing.
    assert client.head(url, **TUS)["Upload-Offset"] == str(len(data))
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/api/media/{item.pk}/complete").status_code == 202
    assert len(sent.for_item(item.pk)) == 1


def test_creation_with_upload_stores_the_first_chunk(api, clip):
    client, _ = api()
    data = clip.read_bytes()
    url, created = _create(client, len(data), body=data[:5000])
    assert created["Upload-Offset"] == "5000"
    assert client.head(url, **TUS)["Upload-Offset"] == "5000"


def test_an_item_created_by_the_json_api_takes_tus_chunks(api, clip, sent, django_capture_on_commit_callbacks):
    client, _ = api()
    data = clip.read_bytes()
    url = create(client, size=len(data)).json()["upload"]["tus_url"]
    with django_capture_on_commit_callbacks(execute=True):
        assert _patch(client, url, 0, data).status_code == 204
    assert len(sent.tasks) == 1


def test_a_whole_file_put_replaces_a_tus_upload_in_progress(api, clip, sent, django_capture_on_commit_callbacks):
    client, _ = api()
    data = clip.read_bytes()
    upload = create(client, size=len(data)).json()["upload"]
    assert _patch(client, upload["tus_url"], 0, data[:1000]).status_code == 204
    assert put(client, upload["url"], data).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        head = client.head(upload["tus_url"], **TUS)  # the PUT brought every byte: HEAD finishes it
    assert head["Upload-Offset"] == str(len(data))
    item = MediaItem.objects.get(pk=upload["tus_url"].rsplit("/", 1)[1])
    assert default_storage.open(item.source_key).read() == data
    assert len(sent.for_item(item.pk)) == 1


def test_patch_rules_content_type_offset_header_and_length(api, clip):
    client, _ = api()
    data = clip.read_bytes()
    url, _ = _create(client, len(data))
    wrong_type = _patch(client, url, 0, data[:10], content_type="application/octet-stream")
    assert wrong_type.status_code == 415
    no_offset = client.generic("PATCH", url, data[:10], content_type=CHUNK, **TUS)
    assert no_offset.status_code == 400 and "Upload-Offset" in error_of(no_offset)["message"]
    too_long = _patch(client, url, 0, data + b"extra")
    assert too_long.status_code == 413
    assert client.head(url, **TUS)["Upload-Offset"] == "0"


def test_a_patch_while_another_holds_the_upload_is_refused_with_423(api, clip, settings):
    client, _ = api()
    data = clip.read_bytes()
    url, _ = _create(client, len(data))
    item_id = url.rsplit("/", 1)[1]
    # What a PATCH in progress on another web process holds.
    lock = redis.Redis.from_url(settings.UPLOADS_REDIS_URL).lock(upload_lock_name(item_id), timeout=30)
    assert lock.acquire(blocking=False)
    try:
        busy = _patch(client, url, 0, data[:100])
        assert busy.status_code == 423 and error_of(busy)["code"] == "upload_locked"
        assert client.delete(url, **TUS).status_code == 423
    finally:
        lock.release()
    assert client.head(url, **TUS)["Upload-Offset"] == "0"
    assert _patch(client, url, 0, data[:100]).status_code == 204


def test_termination_removes_the_upload_and_its_bytes(api, clip):
    client, _ = api()
    data = clip.read_bytes()
    url, _ = _create(client, len(data))
    item_id = url.rsplit("/", 1)[1]
    _patch(client, url, 0, data[:1000])
    assert default_storage.size(f"uploads/{item_id}/source") == 1000
    response = client.delete(url, **TUS)
    assert response.status_code == 204 and response["Tus-Resumable"] == "1.0.0"
    assert not default_storage.exists(f"uploads/{item_id}/source")
    assert client.head(url, **TUS).status_code == 404
    assert not MediaItem.objects.filter(pk=item_id).exists()


def test_idle_uploads_expire_and_the_cleanup_removes_them(api, clip, settings):
    settings.UPLOAD_EXPIRY_SECONDS = 3600
    client, _ = api()
    data = clip.read_bytes()
    stale_url, _ = _create(client, len(data))
    fresh_url, _ = _create(client, len(data))
    stale_id = stale_url.rsplit("/", 1)[1]
    _patch(client, stale_url, 0, data[:1000])
    _patch(client, fresh_url, 0, data[:1000])
    MediaItem.objects.filter(pk=stale_id).update(updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))

    assert client.head(stale_url, **TUS).status_code == 410
    late = _patch(client, stale_url, 1000, data[1000:2000])
    assert late.status_code == 410 and error_of(late)["code"] == "upload_expired"
    assert uploads_expire() == 1
    assert not MediaItem.objects.filter(pk=stale_id).exists()
    assert not default_storage.exists(f"uploads/{stale_id}/source")
    assert client.head(fresh_url, **TUS)["Upload-Offset"] == "1000"


def test_wrong_content_is_refused_at_the_first_chunk_not_after_the_whole_file(api, sent):
    client, _ = api()
    declared = 10 * 1024 * 1024
    url, _ = _create(client, declared, name="page.mp4")
    first = _patch(client, url, 0, HTML_AS_MP4 * 40)
    assert first.status_code == 415
    assert error_of(first)["message"] == "The file is not a video, audio or image file we can read."
    item = MediaItem.objects.get(pk=url.rsplit("/", 1)[1])
    assert item.status == MediaStatus.FAILED and item.error_code == "invalid_input"
    assert not default_storage.exists(f"uploads/{item.pk}/source")
    assert client.head(url, **TUS).status_code == 410
    assert sent.tasks == []


def test_tus_creation_keeps_the_same_limits(api, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    client, _ = api()
    response = client.post("/api/tus/", HTTP_UPLOAD_LENGTH="1001", **TUS)
    assert response.status_code == 413 and error_of(response)["code"] == "too_large"
    assert client.post("/api/tus/", **TUS).status_code == 400  # Upload-Length is required
    deferred = client.post("/api/tus/", HTTP_UPLOAD_DEFER_LENGTH="1", **TUS)
    assert deferred.status_code == 400


def test_metadata_file_names_are_cleaned(api):
    client, _ = api()
    url, _ = _create(client, 10, name="../../etc/passwd\x00\u202e" + "y" * 300)
    item = MediaItem.objects.get(pk=url.rsplit("/", 1)[1])
    assert item.original_name.startswith("../../etc/passwd ") and len(item.original_name) == 255
    assert "\x00" not in item.original_name and "\u202e" not in item.original_name
    assert item.source_key == f"uploads/{item.pk}/source"


def test_a_head_finishes_an_upload_whose_bytes_all_arrived_but_could_not_be_completed(
    api, clip, sent, monkeypatch, django_capture_on_commit_callbacks
):
    client, _ = api()
    client.raise_request_exception = False
    data = clip.read_bytes()
    url, _ = _create(client, len(data))
    item_id = url.rsplit("/", 1)[1]

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unavailable")

    with monkeypatch.context() as patched:
        patched.setattr(uploads, "media_processing_start", broker_down)
        assert _patch(client, url, 0, data).status_code == 500
    item = MediaItem.objects.get(pk=item_id)
    assert item.upload_received == len(data) and item.upload_open and not sent.tasks

    with django_capture_on_commit_callbacks(execute=True):
        head = client.head(url, **TUS)
    assert head.status_code == 200 and head["Upload-Offset"] == str(len(data))
    assert default_storage.open(f"uploads/{item_id}/source").read() == data
    assert len(sent.for_item(item_id)) == 1


def test_bytes_a_dead_patch_wrote_past_the_recorded_offset_are_discarded(
    api, clip, sent, django_capture_on_commit_callbacks
):
    """A web process killed between writing a chunk and recording it leaves bytes the offset
    does not count: the client is told the recorded offset, and its resumed chunk replaces them."""
    client, _ = api()
    data = clip.read_bytes()
    url, _ = _create(client, len(data))
    item = MediaItem.objects.get(pk=url.rsplit("/", 1)[1])
    half = len(data) // 2
    assert _patch(client, url, 0, data[:half]).status_code == 204
    with open(default_storage.path(item.source_key), "ab") as fh:
        fh.write(b"\xff" * 5000)  # what the dead PATCH got on disk

    head = client.head(url, **TUS)
    assert head["Upload-Offset"] == str(half)
    # "Complete" now refuses without dropping the partial upload.
    early = client.post(f"/api/media/{item.pk}/complete")
    assert early.status_code == 409 and error_of(early)["code"] == "not_uploaded"
    with django_capture_on_commit_callbacks(execute=True):
        last = _patch(client, url, half, data[half:])
    assert last.status_code == 204 and last["Upload-Offset"] == str(len(data))
    assert default_storage.open(item.source_key).read() == data
    assert len(sent.for_item(item.pk)) == 1
