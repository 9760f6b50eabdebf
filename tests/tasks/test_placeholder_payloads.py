"""Placeholders and storyboards reach the clients: an image's and a video's ThumbHash in the REST
detail, the websocket's state and GraphQL, each decoding to the picture's mean colour; a video
also lists its storyboard sheet and WebVTT index."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets
from django.test import Client
from PIL import Image, ImageStat
from rest_framework.authtoken.models import Token

from media_app.models import MediaItem
from media_app.services import media_processing_start
from pipelines.placeholder import thumbhash_to_rgba
from tests.conftest import wait_for
from tests.media import drawn_image, lavfi_video

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

GRAPHQL = "query($id: ID!) { mediaItem(id: $id) { placeholder outputs { kind placeholder } } }"


def _mean(img: Image.Image) -> list[float]:
    return list(ImageStat.Stat(img.convert("RGB")).mean)


def _decoded_mean(placeholder: str) -> list[float]:
    w, h, pixels = thumbhash_to_rgba(base64.b64decode(placeholder))
    return _mean(Image.frombytes("RGBA", (w, h), pixels))


async def _first_state(url: str, headers: dict[str, str]) -> dict[str, Any]:
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        return dict(json.loads(await asyncio.wait_for(ws.recv(), 10))["item"])


def _completed(item: Any) -> MediaItem:
    media_processing_start(item=item)
    final = wait_for(
        lambda: MediaItem.objects.filter(pk=item.pk, status__in=("Completed", "Failed")).first(),
        timeout=180,
        what="the item to finish",
    )
    assert final.status == "Completed", (final.error_code, final.error_message)
    return final


def test_image_and_video_placeholders_in_rest_websocket_and_graphql(
    asgi_server: Any, celery_worker: Any, make_item: Any, tmp_path: Path
) -> None:
    image = make_item(drawn_image(tmp_path / "photo.jpg"))
    video = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=3), owner=image.owner)
    owner = image.owner
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=owner)[0].key}"}
    client = Client()
    client.force_login(owner)
    ws_headers = {"Cookie": f"sessionid={client.cookies['sessionid'].value}", "Origin": asgi_server.url}
    for item, role in ((image, "image_webp"), (video, "thumbnail")):
        _completed(item)
        detail = requests.get(f"{asgi_server.url}/api/media/{item.pk}", headers=auth, timeout=30).json()
        placeholder = detail["placeholder"]
        assert placeholder, detail
        (picture,) = [o for o in detail["outputs"] if o["role"] == role]
        assert picture["placeholder"] == placeholder
        # The hash is of the picture the page will load: same mean colour, within quantisation.
        with Image.open(io.BytesIO(requests.get(picture["url"], timeout=30).content)) as loaded:
            want = _mean(loaded)
        assert all(abs(a - b) <= 10 for a, b in zip(_decoded_mean(placeholder), want, strict=True))

        state = asyncio.run(_first_state(f"{asgi_server.ws_url}/ws/media/{item.pk}/", ws_headers))
        assert state["placeholder"] == placeholder

        body = requests.post(
            f"{asgi_server.url}/graphql/", json={"query": GRAPHQL, "variables": {"id": str(item.pk)}}, headers=auth,
            timeout=30,
        ).json()  # fmt: skip
        assert "errors" not in body, body
        got = body["data"]["mediaItem"]
        assert got["placeholder"] == placeholder
        assert {o["kind"]: o["placeholder"] for o in got["outputs"]}[role] == placeholder

    detail = requests.get(f"{asgi_server.url}/api/media/{video.pk}", headers=auth, timeout=30).json()
    roles = {o["role"]: o for o in detail["outputs"]}
    assert {"storyboard", "storyboard_vtt", "manifest", "video", "thumbnail"} <= set(roles)
    vtt = requests.get(roles["storyboard_vtt"]["url"], timeout=30)
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT") and "#xywh=" in vtt.text
    sheet = requests.get(roles["storyboard"]["url"], timeout=30)
    with Image.open(io.BytesIO(sheet.content)) as img:
        assert img.format == "WEBP" and img.size == (roles["storyboard"]["width"], roles["storyboard"]["height"])
