"""Live status with a real websocket client against the live ASGI server and the real worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from django.test import Client

from media_app.services import media_processing_start
from tests.conftest import wait_for
from tests.media import lavfi_video

pytestmark = pytest.mark.worker
FINAL = ("Completed", "Failed")
STAGES = ["demux", "previews", "decode", "normalize", "filter", "encode", "mux", "chunk", "store"]


def session_headers(user: Any, server: Any) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {"Cookie": f"sessionid={client.cookies['sessionid'].value}", "Origin": server.url}


async def collect(url: str, headers: dict[str, str], *, until_final: bool = True, timeout: float = 120) -> list[dict]:
    messages: list[dict] = []
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        async with asyncio.timeout(timeout):
            while True:
                messages.append(json.loads(await ws.recv()))
                if not until_final or messages[-1]["item"]["status"] in FINAL:
                    return messages


async def close_code(url: str, headers: dict[str, str]) -> int:
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                await ws.recv()
        return ws.close_code


def test_owner_sees_pending_then_each_stage_in_order_then_completed(asgi_server, celery_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=3))
    url = f"{asgi_server.ws_url}/ws/media/{item.pk}/"
    headers = session_headers(item.owner, asgi_server)

    async def scenario() -> list[dict]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await asyncio.to_thread(media_processing_start, item=item)
            messages = [first]
            async with asyncio.timeout(120):
                while messages[-1]["item"]["status"] not in FINAL:
                    messages.append(json.loads(await ws.recv()))
            return messages

    messages = asyncio.run(scenario())

    assert messages[0]["type"] == "media.status" and messages[0]["item"]["status"] == "Pending"
    statuses = [m["item"]["status"] for m in messages]
    assert statuses[-1] == "Completed"
    assert statuses == sorted(statuses, key=["Pending", "Processing", "Completed"].index)
    stages = [m["item"]["stage"] for m in messages if m["item"]["status"] == "Processing"]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == STAGES
    progress = [m["item"]["progress"] for m in messages]
    assert progress == sorted(progress) and progress[-1] == 100
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    outputs = {o["role"] for o in messages[-1]["item"]["outputs"]}
    assert {"video", "thumbnail", "manifest"} <= outputs


def test_a_late_client_first_receives_the_current_state(asgi_server, celery_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=8, size="640x360"))
    media_processing_start(item=item)

    def processing() -> bool:
        item.refresh_from_db()
        return item.status == "Processing" and item.stage in ("encode", "mux", "chunk")

    wait_for(processing, timeout=60, what="the encode to start")
    seen_seq = item.event_seq
    headers = session_headers(item.owner, asgi_server)
    messages = asyncio.run(collect(f"{asgi_server.ws_url}/ws/media/{item.pk}/", headers))

    first = messages[0]["item"]
    assert first["status"] == "Processing" and first["stage"] in STAGES[STAGES.index("encode") :]
    assert messages[0]["seq"] >= seen_seq
    assert messages[-1]["item"]["status"] == "Completed"


def test_strangers_and_anonymous_clients_are_refused(asgi_server, make_item, make_user, tmp_path):
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=1))
    url = f"{asgi_server.ws_url}/ws/media/{item.pk}/"
    stranger = session_headers(make_user(), asgi_server)
    owner = session_headers(item.owner, asgi_server)

    assert asyncio.run(close_code(url, stranger)) == 4404
    assert asyncio.run(close_code(url, {"Origin": asgi_server.url})) == 4401
    assert asyncio.run(close_code(f"{asgi_server.ws_url}/ws/media/not-a-uuid/", owner)) == 4404

    foreign = {**owner, "Origin": "https://evil.example"}
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(collect(url, foreign))
    assert refused.value.response.status_code == 403


def test_a_failing_item_reports_failed_with_code_and_message(asgi_server, celery_worker, make_item, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 5000)
    item = make_item(bad)
    headers = session_headers(item.owner, asgi_server)

    async def scenario() -> list[dict]:
        async with websockets.connect(f"{asgi_server.ws_url}/ws/media/{item.pk}/", additional_headers=headers) as ws:
            messages = [json.loads(await asyncio.wait_for(ws.recv(), 10))]
            await asyncio.to_thread(media_processing_start, item=item)
            async with asyncio.timeout(60):
                while messages[-1]["item"]["status"] not in FINAL:
                    messages.append(json.loads(await ws.recv()))
            return messages

    last = asyncio.run(scenario())[-1]["item"]
    assert last["status"] == "Failed"
    assert last["error"]["code"] == "invalid_input"
    assert last["error"]["message"]


def test_the_list_socket_streams_all_of_the_users_items(asgi_server, celery_worker, make_item, make_user, tmp_path):
    owner = make_user()
    items = [make_item(lavfi_video(tmp_path / f"c{i}.mp4", seconds=1), owner=owner) for i in range(2)]
    make_item(lavfi_video(tmp_path / "other.mp4", seconds=1))  # someone else's
    headers = session_headers(owner, asgi_server)

    async def scenario() -> dict[str, str]:
        async with websockets.connect(f"{asgi_server.ws_url}/ws/media/", additional_headers=headers) as ws:
            latest: dict[str, str] = {}
            for _ in items:  # the snapshot: one message per item
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                latest[msg["item"]["id"]] = msg["item"]["status"]
            for item in items:
                await asyncio.to_thread(media_processing_start, item=item)
            async with asyncio.timeout(120):
                while not all(s in FINAL for s in latest.values()):
                    msg = json.loads(await ws.recv())
                    latest[msg["item"]["id"]] = msg["item"]["status"]
            return latest

    latest = asyncio.run(scenario())
    assert latest == {str(i.pk): "Completed" for i in items}
