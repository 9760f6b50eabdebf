"""Create refuses, before any byte, a name or declared type that can never be accepted.

The answer is the one the upload would get once its bytes were sniffed (415,
``unsupported_type``), from every way in: REST, tus and GraphQL. No item is made, so nothing is
left to expire. The name is only a first filter: the bytes stay the real check either way.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from media_app.models import MediaItem, MediaStatus
from tests.media_app.test_api_support import PHP_AS_JPG, create, error_of, put
from tests.media_app.test_graphql_api import CREATE, Gql, error

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("local_storage")]

TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}

# (name, declared type, what the refusal names)
NEVER = [
    ("shell.php", "", "PHP"),
    ("SHELL.PHP", "video/mp4", "PHP"),
    ("photo.jpg.php", "image/jpeg", "PHP"),
    ("shell.php.", "", "PHP"),  # Windows saves it as shell.php
    ("setup.exe", "", "EXE"),
    ("photo\u202egpj.exe", "", "EXE"),  # shown right to left as "photoexe.jpg"
    ("page.html", "", "HTML"),
    ("logo.svg", "", "SVG"),
    ("app.js", "", "JS"),
    ("clip.mp4", "text/html", "text/html"),
    ("clip.mp4", "text/html; charset=utf-8", "text/html"),
    ("photo.jpg", "application/x-php", "application/x-php"),
    ("photo", "image/svg+xml", "image/svg+xml"),
]


def _tus_create(client: Any, *, name: str, size: int, content_type: str) -> Any:
    meta = ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in (("filename", name), ("filetype", content_type))
        if value
    )
    return client.post("/api/tus/", HTTP_UPLOAD_LENGTH=str(size), HTTP_UPLOAD_METADATA=meta, **TUS)


@pytest.mark.parametrize(("name", "content_type", "what"), NEVER)
def test_rest_tus_and_graphql_refuse_at_create_as_the_upload_would(api, sent, name, content_type, what):
    client, user = api()
    message = f"{what} files are not accepted here; send a video, audio or image file."
    expected = {"code": "unsupported_type", "message": message}

    rest = create(client, name=name, size=1000, content_type=content_type)
    tus = _tus_create(client, name=name, size=1000, content_type=content_type)
    token = client._credentials["HTTP_AUTHORIZATION"].split()[1]
    graphql = Gql(token)(CREATE, name=name, size=1000, type=content_type)

    assert (rest.status_code, error_of(rest)) == (415, expected)
    assert (tus.status_code, error_of(tus)) == (415, expected)
    assert error(graphql) == expected
    assert not MediaItem.objects.filter(owner=user).exists()
    assert sent.tasks == []


def test_the_refusal_at_create_is_the_answer_the_bytes_would_get(api, sent):
    """Same status and code as a PHP script sent under a photo's name, refused by its bytes."""
    client, _ = api()
    disguised = create(client, name="shell.jpg", size=len(PHP_AS_JPG), content_type="image/jpeg")
    assert disguised.status_code == 201  # nothing in the name or type gives it away
    by_bytes = put(client, disguised.json()["upload"]["url"], PHP_AS_JPG)
    by_name = create(client, name="shell.php", size=len(PHP_AS_JPG), content_type="image/jpeg")

    assert by_bytes.status_code == by_name.status_code == 415
    assert error_of(by_bytes)["code"] == error_of(by_name)["code"] == "unsupported_type"
    item = MediaItem.objects.get(pk=disguised.json()["id"])
    assert (item.status, item.error_code) == (MediaStatus.FAILED, "invalid_input")
    assert sent.tasks == []


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("photo", ""), ("photo", "application/octet-stream"), ("IMG_0001.JPG.download", ""), ("camera.dat", "")],
)
def test_a_real_photo_with_an_odd_name_or_no_type_is_accepted_and_judged_by_its_bytes(
    api, photo, sent, name, content_type, django_capture_on_commit_callbacks
):
    client, _ = api()
    data = photo.read_bytes()
    created = create(client, name=name, size=len(data), content_type=content_type)
    assert created.status_code == 201, created.content
    body = created.json()
    assert put(client, body["upload"]["url"], data).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        completed = client.post(f"/api/media/{body['id']}/complete")
    assert completed.status_code in (200, 202), completed.content
    item = MediaItem.objects.get(pk=body["id"])
    assert (item.status, item.kind, item.detected_content_type) == (MediaStatus.PENDING, "image", "image/jpeg")
    assert len(sent.for_item(item.pk)) == 1  # queued for processing once
