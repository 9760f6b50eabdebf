"""Fixtures and helpers shared by the API, tus and S3 tests (no tests here).

Loaded by those modules with ``pytest_plugins``; nothing here is autouse, so it changes no
other test. ``sent`` records what would reach the broker instead of sending it, which is how
"nothing is enqueued" and "enqueued once" are asserted without a worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

HTML_AS_MP4 = b"<!DOCTYPE html>\n<html><body><script>alert(document.cookie)</script></body></html>\n" * 3
PHP_AS_JPG = b"<?php system($_GET['cmd']); ?>\n" + b"\x00" * 200


@dataclass
class Sent:
    tasks: list[tuple[str, list[Any], str | None]] = field(default_factory=list)
    revoked: list[tuple[str, bool]] = field(default_factory=list)

    def for_item(self, item_id: Any) -> list[tuple[str, list[Any], str | None]]:
        return [t for t in self.tasks if t[1] == [str(item_id)]]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Tasks sent and revoked through the Celery app, recorded instead of reaching a broker."""
    from config.celery import app

    record = Sent()

    def send_task(name: str, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any) -> Any:
        record.tasks.append((name, list(args or []), task_id))

    def revoke(task_id: str, terminate: bool = False, **options: Any) -> None:
        record.revoked.append((task_id, terminate))

    monkeypatch.setattr(app, "send_task", send_task)
    monkeypatch.setattr(app.control, "revoke", revoke)
    return record


@pytest.fixture
def api_isolation(settings: Any, tmp_path: Path) -> None:
    """Own rate-limit counters (user ids repeat across rolled-back tests) and staging directory."""
    # Users are made by the dozen here; the real hasher costs half a second each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.CACHES = {**settings.CACHES, "uploads": {**settings.CACHES["uploads"], "KEY_PREFIX": uuid.uuid4().hex}}
    settings.UPLOAD_STAGING_DIR = tmp_path / "staging"


@pytest.fixture
def local_storage(tmp_storage: Path, api_isolation: None) -> Path:
    """Local file storage in a tmp dir; returns its root."""
    return tmp_storage


@pytest.fixture
def api(make_user: Callable[..., Any]) -> Callable[..., tuple[APIClient, Any]]:
    """``api()`` -> (client authenticated by a real token, its user); ``api(user)`` for a given user."""

    def make(user: Any = None, *, staff: bool = False) -> tuple[APIClient, Any]:
        user = user or make_user(staff=staff)
        token, _ = Token.objects.get_or_create(user=user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return client, user

    return make


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.media import lavfi_video

    return lavfi_video(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=2)


@pytest.fixture(scope="session")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.media import drawn_image

    return drawn_image(tmp_path_factory.mktemp("photo") / "photo.jpg", size=(320, 240))


def create(client: APIClient, *, name: str = "clip.mp4", size: int, content_type: str = "video/mp4") -> Any:
    return client.post("/api/media/", {"file_name": name, "size": size, "content_type": content_type}, format="json")


def put(client: APIClient, url: str, data: bytes) -> Any:
    return client.generic("PUT", url, data, content_type="application/octet-stream")


def error_of(response: Any) -> dict[str, Any]:
    """The error body every refusal carries, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] and body["error"]["message"].endswith((".", ")")), body
    return dict(body["error"])
