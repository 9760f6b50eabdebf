"""The JSON API in-process: create, presigned PUT, complete, read, delete, retry, limits, ownership.

Storage is a tmp dir; tasks are recorded (``sent``) rather than sent, so "enqueued once" and
"nothing enqueued" are exact. The same flows over HTTP against uvicorn are in test_api_live.py.
"""

from __future__ import annotations

import io
import json
from urllib.parse import urlparse

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core import signing
from django.core.files.storage import default_storage
from django.core.management import call_command
from rest_framework.test import APIClient

from media_app.models import MediaItem, MediaStatus
from media_app.services import (
    ErrorReport,
    item_group,
    media_item_create,
    media_item_store_source,
    renditions_replace,
)
from tests.media_app.test_api_support import HTML_AS_MP4, PHP_AS_JPG, create, error_of, put
from tests.states import set_state

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("local_storage")]


def _upload(client, data: bytes, *, name: str = "clip.mp4", content_type: str = "video/mp4"):
    created = create(client, name=name, size=len(data), content_type=content_type)
    assert created.status_code == 201, created.content
    body = created.json()
    stored = put(client, body["upload"]["url"], data)
    return body, stored


# --- create and authenticate -----------------------------------------------------------------


def test_create_answers_pending_item_with_presigned_put_and_tus_url(api):
    client, _ = api()
    response = create(client, size=1234)
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "Pending" and body["size"] == 1234 and body["file_name"] == "clip.mp4"
    upload = body["upload"]
    assert upload["method"] == "PUT"
    assert urlparse(upload["url"]).path.startswith("/api/uploads/")
    assert upload["expires_at"] > body["created_at"]
    assert upload["tus_url"].endswith(f"/api/tus/{body['id']}")
    assert upload["complete_url"].endswith(f"/api/media/{body['id']}/complete")
    assert response["Location"].endswith(f"/api/media/{body['id']}")
    assert MediaItem.objects.get(pk=body["id"]).source_key == f"uploads/{body['id']}/source"


def test_anonymous_callers_get_401_with_a_json_error():
    response = APIClient().post("/api/media/", {"file_name": "a.mp4", "size": 5}, format="json")
    assert response.status_code == 401
    assert error_of(response)["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"
    assert APIClient().get("/api/media/").status_code == 401


def test_token_from_the_management_command_and_a_session_both_authenticate(make_user):
    user = make_user("alice")
    out = io.StringIO()
    call_command("create_token", "alice", stdout=out)
    key = out.getvalue().strip()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/media/").status_code == 200

    again = io.StringIO()
    call_command("create_token", "alice", stdout=again)
    assert again.getvalue().strip() == key  # shown again, not replaced
    call_command("create_token", "alice", "--reset", stdout=io.StringIO())
    assert client.get("/api/media/").status_code == 401

    browser = APIClient(enforce_csrf_checks=True)
    assert browser.login(username=user.username, password="pw-123456")
    assert browser.get("/api/media/").status_code == 200


def test_invalid_input_is_a_400_naming_the_field(api):
    client, _ = api()
    response = client.post("/api/media/", {"file_name": "a.mp4", "size": 0}, format="json")
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid" and "size" in error["fields"]


# --- presigned PUT and complete ---------------------------------------------------------------


def test_presigned_put_stores_the_bytes_under_the_generated_key_and_a_double_complete_enqueues_once(
    api, clip, sent, django_capture_on_commit_callbacks, local_storage
):
    client, _ = api()
    data = clip.read_bytes()
    body, stored = _upload(client, data)
    assert stored.status_code == 200, stored.content
    item = MediaItem.objects.get(pk=body["id"])
    assert default_storage.open(item.source_key).read() == data
    assert (local_storage / "uploads" / body["id"] / "source").read_bytes() == data

    with django_capture_on_commit_callbacks(execute=True):
        first = client.post(f"/api/media/{body['id']}/complete")
        second = client.post(f"/api/media/{body['id']}/complete")
    assert first.status_code == second.status_code == 202
    assert first.json()["status"] == "Pending"
    assert sent.for_item(body["id"]) == [("media.process", [body["id"]], MediaItem.objects.get(pk=body["id"]).task_id)]
    item.refresh_from_db()
    assert item.detected_content_type == "video/mp4"


def test_an_image_gets_its_kind_from_its_bytes_at_complete(api, photo, sent, django_capture_on_commit_callbacks):
    client, _ = api()
    body, stored = _upload(client, photo.read_bytes(), name="photo.jpg", content_type="image/jpeg")
    assert stored.status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/api/media/{body['id']}/complete").status_code == 202
    item = MediaItem.objects.get(pk=body["id"])
    assert (item.kind, item.detected_content_type) == ("image", "image/jpeg")
    assert len(sent.for_item(item.pk)) == 1


def test_complete_before_any_bytes_is_a_409(api, sent):
    client, _ = api()
    body = create(client, size=100).json()
    response = client.post(f"/api/media/{body['id']}/complete")
    assert response.status_code == 409
    assert error_of(response)["code"] == "not_uploaded"
    assert sent.tasks == []


def test_expired_or_tampered_presigned_urls_are_refused_with_403(api, clip, settings):
    client, _ = api()
    data = clip.read_bytes()
    body = create(client, size=len(data)).json()
    url = body["upload"]["url"]
    token = url.rsplit("/", 1)[1]

    payload = signing.loads(token, salt="media_app.api.upload")
    forged = signing.dumps({**payload, "s": payload["s"] + 1}, salt="media_app.api.upload", key="not-our-secret")
    tampered = [url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"), url.replace(token, forged)]
    for bad in tampered:
        response = put(client, bad, data)
        assert response.status_code == 403
        assert error_of(response)["code"] == "url_invalid"

    settings.UPLOAD_URL_EXPIRY_SECONDS = -1
    expired = create(client, size=len(data)).json()["upload"]["url"]
    response = put(client, expired, data)
    assert response.status_code == 403
    assert error_of(response) == {"code": "url_expired", "message": "This URL has expired; ask for a new one."}
    assert not default_storage.exists(f"uploads/{body['id']}/source")


def test_presigned_put_with_the_wrong_size_is_a_400_and_stores_nothing(api, clip):
    client, _ = api()
    data = clip.read_bytes()
    body = create(client, size=len(data)).json()
    for wrong in (data[:-1], data + b"x"):
        response = put(client, body["upload"]["url"], wrong)
        assert response.status_code == 400
        assert error_of(response)["code"] == "size_mismatch"
    assert not default_storage.exists(f"uploads/{body['id']}/source")
    assert put(client, body["upload"]["url"], data).status_code == 200


# --- limits ------------------------------------------------------------------------------------


def test_a_declared_size_over_the_limit_is_413_before_any_byte(api, settings, sent):
    settings.UPLOAD_MAX_BYTES = 1000
    client, user = api()
    response = create(client, size=1001)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_large" and "1000 bytes" in error["message"]
    assert not MediaItem.objects.filter(owner=user).exists()
    assert sent.tasks == []


@pytest.mark.parametrize(
    ("name", "content_type", "data"),
    [("page.mp4", "video/mp4", HTML_AS_MP4), ("shell.jpg", "image/jpeg", PHP_AS_JPG)],
)
def test_wrong_content_is_refused_with_415_whatever_its_name_and_nothing_is_enqueued(
    api, sent, name, content_type, data, django_capture_on_commit_callbacks
):
    client, _ = api()
    with django_capture_on_commit_callbacks(execute=True):
        body, stored = _upload(client, data, name=name, content_type=content_type)
        complete = client.post(f"/api/media/{body['id']}/complete")
    # Refused as soon as the first bytes show what the file is: the PUT itself.
    assert stored.status_code == 415
    assert error_of(stored) == {
        "code": "unsupported_type",
        "message": "The file is not a video, audio or image file we can read.",
    }
    assert complete.status_code == 409  # nothing left to complete
    item = MediaItem.objects.get(pk=body["id"])
    assert item.status == MediaStatus.FAILED and item.error_code == "invalid_input"
    assert not default_storage.exists(f"uploads/{body['id']}/source")
    assert sent.tasks == []


def test_a_type_outside_the_allowed_list_is_refused_at_complete(
    api, photo, settings, sent, django_capture_on_commit_callbacks
):
    client, _ = api()
    body, stored = _upload(client, photo.read_bytes(), name="photo.jpg")
    assert stored.status_code == 200
    settings.UPLOAD_ALLOWED_CONTENT_TYPES = ["video/mp4"]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/media/{body['id']}/complete")
    assert response.status_code == 415
    assert error_of(response)["message"] == "image/jpeg files are not accepted here."
    assert sent.tasks == []


def test_quota_of_bytes_is_413_quota_exceeded(api, settings, sent):
    settings.UPLOAD_QUOTA_BYTES = 10_000
    client, _ = api()
    assert create(client, size=6_000).status_code == 201
    response = create(client, size=5_000)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "quota_exceeded" and "quota" in error["message"]
    assert sent.tasks == []


def test_too_many_unfinished_uploads_is_429(api, settings):
    settings.UPLOAD_MAX_UNFINISHED = 2
    client, _ = api()
    first = create(client, size=10).json()
    assert create(client, size=10).status_code == 201
    response = create(client, size=10)
    assert response.status_code == 429
    assert error_of(response)["code"] == "too_many_uploads"
    assert client.delete(f"/api/media/{first['id']}").status_code == 204
    assert create(client, size=10).status_code == 201


def test_creates_are_rate_limited_with_retry_after(api, settings):
    settings.UPLOAD_CREATE_RATE = "3/minute"
    client, _ = api()
    for _ in range(3):
        assert create(client, size=10).status_code == 201
    response = create(client, size=10)
    assert response.status_code == 429
    assert error_of(response)["code"] == "rate_limited"
    assert 0 < int(response["Retry-After"]) <= 60
    other, _ = api()
    assert create(other, size=10).status_code == 201  # counted per user


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../../etc/passwd", "../../etc/passwd"),
        ("evil\x00.mp4", "evil .mp4"),
        ("clip\u202evom.mp4", "clip vom.mp4"),
        ('a"b\\c</script>.mp4', 'a"b\\c</script>.mp4'),
        ("x" * 300 + ".mp4", "x" * 251 + ".mp4"),
    ],
)
def test_hostile_file_names_are_display_names_only(api, clip, local_storage, raw, shown):
    client, _ = api()
    data = clip.read_bytes()
    body, stored = _upload(client, data, name=raw)
    assert stored.status_code == 200
    assert body["file_name"] == shown
    assert len(body["file_name"]) <= 255
    item = MediaItem.objects.get(pk=body["id"])
    assert item.source_key == f"uploads/{item.pk}/source"
    files = sorted(str(p.relative_to(local_storage)) for p in local_storage.rglob("*") if p.is_file())
    assert files == [f"uploads/{item.pk}/source"]
    raw_json = client.get(f"/api/media/{item.pk}").content.decode()
    assert "\x00" not in raw_json and "\u202e" not in raw_json
    assert json.loads(raw_json)["file_name"] == shown


# --- ownership -----------------------------------------------------------------------------------


def test_another_users_item_is_404_everywhere_and_staff_see_it(api, clip, sent):
    owner, _ = api()
    data = clip.read_bytes()
    body, _ = _upload(owner, data)
    item_id = body["id"]
    stranger, _ = api()
    for method, path in [
        ("get", f"/api/media/{item_id}"),
        ("post", f"/api/media/{item_id}/complete"),
        ("post", f"/api/media/{item_id}/retry"),
        ("delete", f"/api/media/{item_id}"),
    ]:
        response = getattr(stranger, method)(path)
        assert response.status_code == 404, (method, path)
        assert error_of(response)["code"] == "not_found"
    tus = {"HTTP_TUS_RESUMABLE": "1.0.0"}
    assert stranger.head(f"/api/tus/{item_id}", **tus).status_code == 404
    assert stranger.delete(f"/api/tus/{item_id}", **tus).status_code == 404
    assert stranger.get("/api/media/").json()["count"] == 0
    assert stranger.get("/api/media/not-a-uuid").status_code == 404
    assert MediaItem.objects.filter(pk=item_id).exists() and default_storage.exists(f"uploads/{item_id}/source")

    staff, _ = api(staff=True)
    assert staff.get(f"/api/media/{item_id}").json()["id"] == item_id
    assert staff.get("/api/media/").json()["count"] == 1


# --- read ----------------------------------------------------------------------------------------


def test_list_is_paginated_and_filtered_by_status_and_kind(api):
    client, user = api()
    items = [media_item_create(owner=user, original_name=f"f{i}.mp4", size=1) for i in range(5)]
    set_state(item_id=items[0].pk, status=MediaStatus.FAILED, error=ErrorReport("invalid_input", "Bad."))
    set_state(item_id=items[1].pk, extra={"kind": "image"})
    page = client.get("/api/media/?page_size=2").json()
    assert page["count"] == 5 and len(page["results"]) == 2 and page["next"]
    assert [r["file_name"] for r in page["results"]] == ["f4.mp4", "f3.mp4"]
    failed = client.get("/api/media/?status=Failed").json()
    assert [r["id"] for r in failed["results"]] == [str(items[0].pk)]
    assert failed["results"][0]["error"] == {"code": "invalid_input", "message": "Bad."}
    assert [r["id"] for r in client.get("/api/media/?kind=image").json()["results"]] == [str(items[1].pk)]
    bad = client.get("/api/media/?status=Done")
    assert bad.status_code == 400 and "status" in error_of(bad)["fields"]


def _completed_item(user, tmp_path, data: bytes):
    item = media_item_create(owner=user, original_name="holiday.mov", size=len(data))
    media_item_store_source(item=item, fileobj=io.BytesIO(data))
    key = f"outputs/{item.pk}/video.webm"
    default_storage.save(key, io.BytesIO(data))
    renditions_replace(
        item_id=item.pk,
        renditions=[{"role": "video", "storage_key": key, "content_type": "video/webm", "bytes": len(data)}],
    )
    set_state(item_id=item.pk, status=MediaStatus.COMPLETED, progress=100)
    return item, key


def test_detail_has_outputs_with_signed_download_urls_that_serve_ranges(api, tmp_path, settings):
    client, user = api()
    data = bytes(range(256)) * 40
    item, _ = _completed_item(user, tmp_path, data)
    body = client.get(f"/api/media/{item.pk}").json()
    assert body["status"] == "Completed" and body["progress"] == 100
    [out] = body["outputs"]
    assert out["role"] == "video" and out["content_type"] == "video/webm"
    anonymous = APIClient()  # the signed URL is the credential, as with S3
    full = anonymous.get(out["url"])
    assert full.status_code == 200 and full["Content-Type"] == "video/webm"
    assert b"".join(full.streaming_content) == data
    assert full["Accept-Ranges"] == "bytes" and full["Content-Length"] == str(len(data))
    assert 'filename="holiday.webm"' in full["Content-Disposition"]

    part = anonymous.get(out["url"], HTTP_RANGE="bytes=100-199")
    assert part.status_code == 206 and part["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert b"".join(part.streaming_content) == data[100:200]
    tail = anonymous.get(out["url"], HTTP_RANGE="bytes=-10")
    assert b"".join(tail.streaming_content) == data[-10:]
    beyond = anonymous.get(out["url"], HTTP_RANGE=f"bytes={len(data)}-")
    assert beyond.status_code == 416 and beyond["Content-Range"] == f"bytes */{len(data)}"
    head = anonymous.head(out["url"])
    assert head.status_code == 200 and head["Content-Length"] == str(len(data))

    assert anonymous.get(out["url"][:-2] + "xx").status_code == 403
    settings.DOWNLOAD_URL_EXPIRY_SECONDS = -1
    expired = client.get(f"/api/media/{item.pk}").json()["outputs"][0]["url"]
    response = anonymous.get(expired)
    assert response.status_code == 403 and error_of(response)["code"] == "url_expired"


# --- delete and retry ------------------------------------------------------------------------------


def test_delete_cancels_processing_revokes_the_task_and_removes_every_file(
    api, tmp_path, sent, settings, django_capture_on_commit_callbacks
):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    client, user = api()
    item, key = _completed_item(user, tmp_path, b"x" * 100)
    set_state(item_id=item.pk, status=MediaStatus.PROCESSING, stage="encode", extra={"task_id": "task-42"})
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(item_group(item.pk), channel)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.delete(f"/api/media/{item.pk}")
    assert response.status_code == 204
    event = async_to_sync(layer.receive)(channel)
    assert event["item"]["status"] == "Failed" and event["item"]["error"]["code"] == "cancelled"
    assert sent.revoked == [("task-42", True)]
    assert not default_storage.exists(item.source_key) and not default_storage.exists(key)
    assert not MediaItem.objects.filter(pk=item.pk).exists()
    assert client.get(f"/api/media/{item.pk}").status_code == 404


def test_retry_sends_a_failed_item_back_to_pending_and_enqueues_it(api, clip, sent, django_capture_on_commit_callbacks):
    client, user = api()
    item = media_item_create(owner=user, original_name="a.mp4", size=clip.stat().st_size)
    media_item_store_source(item=item, fileobj=clip.open("rb"))
    set_state(
        item_id=item.pk,
        status=MediaStatus.FAILED,
        attempts=3,
        error=ErrorReport("timeout", "Processing took longer than allowed."),
        extra={"task_id": "old"},
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/media/{item.pk}/retry")
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["error"], body["attempts"]) == ("Pending", None, 0)
    assert len(sent.for_item(item.pk)) == 1
    again = client.post(f"/api/media/{item.pk}/retry")
    assert again.status_code == 409 and error_of(again)["code"] == "not_failed"
    assert len(sent.for_item(item.pk)) == 1


# --- schema --------------------------------------------------------------------------------------


def test_openapi_schema_is_served():
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert {"/api/media/", "/api/media/{item_id}", "/api/media/{item_id}/complete"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/api/media/"]


def test_upload_expiry_time_is_reported_for_open_uploads(api):
    client, _ = api()
    body = create(client, size=10).json()
    detail = client.get(f"/api/media/{body['id']}").json()
    assert detail["upload"]["offset"] == 0
    assert detail["upload"]["expires_at"] > detail["created_at"]


@pytest.mark.parametrize(
    ("name", "content_type", "args"),
    [
        ("camcorder.m2ts", "video/mp2t", ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1",
                                          "-c:v", "libx264", "-mpegts_m2ts_mode", "1", "-f", "mpegts"]),
        ("dvd.vob", "video/mpeg", ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1",
                                   "-c:v", "mpeg2video", "-f", "vob"]),
        ("song.aiff", "audio/aiff", ["-f", "lavfi", "-i", "sine=duration=1", "-f", "aiff"]),
    ],
)  # fmt: skip
def test_formats_the_pipeline_reads_are_accepted_by_the_web_too(api, sent, tmp_path, name, content_type, args,
                                                                 django_capture_on_commit_callbacks):  # fmt: skip
    """The web's allow-list is the sniffer's table: what `manage.py process` converts, an upload may hold."""
    from tests.media import make_media

    client, _ = api()
    data = make_media(tmp_path / name, args).read_bytes()
    body, stored = _upload(client, data, name=name, content_type=content_type)
    assert stored.status_code == 200, stored.content
    with django_capture_on_commit_callbacks(execute=True):
        complete = client.post(f"/api/media/{body['id']}/complete")
    assert complete.status_code == 202, complete.content
    assert len(sent.for_item(body["id"])) == 1
