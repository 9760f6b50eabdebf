"""Who may do what, through every way into an item, against the live server.

Every way in — REST (list, detail, create, complete, retry, delete), tus (OPTIONS, POST, HEAD,
PATCH, DELETE), GraphQL over HTTP (queries and mutations), the ``mediaStatus`` subscription over
graphql-transport-ws, the two plain websocket routes, and the signed URLs (presigned PUT,
download, DASH) — is called by four callers: nobody, another user, the owner and staff. Each
cell states the answer. Another user's item is "not found" everywhere, and after every refused
call the item is checked to be untouched.

The signed URLs are their own credential (as S3's presigned URLs are): whoever holds one gets
that one object, and nothing else — not after it expired, not edited, not for another item
whatever the path says, not for another purpose.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import websockets
from django.core import signing
from django.core.files.storage import default_storage
from django.test import Client as DjangoClient
from django.utils import timezone
from rest_framework.authtoken.models import Token

from media_app.api.signing import DASH_SALT, DOWNLOAD_SALT, UPLOAD_SALT
from media_app.models import MediaItem, MediaStatus
from media_app.services import media_item_create, media_item_store_source, renditions_replace

pytestmark = pytest.mark.django_db(transaction=True)

CALLERS = ("anonymous", "stranger", "owner", "staff")
TUS = {"Tus-Resumable": "1.0.0"}
MANIFEST = b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011"></MPD>'


@dataclass
class Caller:
    """One kind of caller with both credentials: a token (REST, GraphQL) and a session cookie
    (websockets, as the page uses them)."""

    name: str
    user: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    cookie: str | None = None

    def __post_init__(self) -> None:
        if self.user is not None:
            self.headers = {"Authorization": f"Token {Token.objects.get_or_create(user=self.user)[0].key}"}
            client = DjangoClient()
            client.force_login(self.user)
            self.cookie = f"sessionid={client.cookies['sessionid'].value}"


@pytest.fixture
def callers(make_user: Any) -> dict[str, Caller]:
    return {
        "anonymous": Caller("anonymous"),
        "stranger": Caller("stranger", make_user()),
        "owner": Caller("owner", make_user()),
        "staff": Caller("staff", make_user(staff=True)),
    }


def pending_item(server: Any, caller: Caller, size: int = 10) -> dict[str, Any]:
    """An item created through the API, upload open: the created answer (with its upload URLs)."""
    body = {"file_name": "clip.mp4", "size": size, "content_type": "video/mp4"}
    created = requests.post(f"{server.url}/api/media/", json=body, headers=caller.headers, timeout=30)
    assert created.status_code == 201, created.text
    return dict(created.json())


def completed_item(owner: Any, files: dict[str, bytes]) -> MediaItem:
    """A Completed item with a WebM, a DASH manifest and segment files, stored as a run leaves them."""
    item = media_item_create(owner=owner, original_name="holiday.mov", size=4)
    media_item_store_source(item=item, fileobj=io.BytesIO(b"src!"))
    renditions = []
    for name, data in files.items():
        key = f"outputs/{item.pk}/{name}"
        default_storage.save(key, io.BytesIO(data))
        role = "manifest" if name.endswith(".mpd") else "segment" if name.startswith("dash/") else "video"
        renditions.append({"role": role, "storage_key": key, "content_type": "", "bytes": len(data)})
    renditions_replace(item_id=item.pk, renditions=renditions)
    # The row as a finished run leaves it (no broadcast: nobody watches yet).
    MediaItem.objects.filter(pk=item.pk).update(status=MediaStatus.COMPLETED, progress=100, finished_at=timezone.now())
    return MediaItem.objects.get(pk=item.pk)


def state(item_id: Any) -> tuple[Any, ...] | None:
    """What a refused call must not change: the row's state and the bytes received."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None:
        return None
    return (item.status, item.event_seq, item.error_code, item.upload_received)


def code_of(response: requests.Response) -> str:
    return str(response.json()["error"]["code"])


# --- REST and tus -------------------------------------------------------------------------------


def test_rest_and_tus_matrix(asgi_server, callers):
    url = asgi_server.url
    owner = callers["owner"]
    shared = pending_item(asgi_server, owner)  # the item strangers and nobody try to reach
    item_id = shared["id"]
    before = state(item_id)
    got: dict[tuple[str, str], Any] = {}

    for name in CALLERS:
        caller = callers[name]
        h = caller.headers
        # Owner and staff change things, so each of them gets an item of their own (the owner's).
        target = item_id if name in ("anonymous", "stranger") else None

        def item_for_write(target: str | None = target) -> str:
            return target or pending_item(asgi_server, owner)["id"]

        listed = requests.get(f"{url}/api/media/", headers=h, timeout=30)
        got[name, "list"] = (
            listed.status_code,
            item_id in {i["id"] for i in listed.json().get("results", [])} if listed.ok else None,
        )
        got[name, "detail"] = requests.get(f"{url}/api/media/{item_id}", headers=h, timeout=30).status_code
        created = requests.post(f"{url}/api/media/", json={"file_name": "a.jpg", "size": 5}, headers=h, timeout=30)
        got[name, "create"] = created.status_code
        if created.status_code == 201:
            assert MediaItem.objects.get(pk=created.json()["id"]).owner_id == caller.user.pk  # always the caller's
        complete = requests.post(f"{url}/api/media/{item_id}/complete", headers=h, timeout=30)
        got[name, "complete"] = (complete.status_code, code_of(complete))
        retry = requests.post(f"{url}/api/media/{item_id}/retry", headers=h, timeout=30)
        got[name, "retry"] = (retry.status_code, code_of(retry))
        victim = item_for_write()
        got[name, "delete"] = requests.delete(f"{url}/api/media/{victim}", headers=h, timeout=30).status_code

        got[name, "tus options"] = requests.options(f"{url}/api/tus/{item_id}", timeout=30).status_code
        tus_create = requests.post(
            f"{url}/api/tus/", headers={**h, **TUS, "Upload-Length": "5"}, timeout=30
        ).status_code
        got[name, "tus create"] = tus_create
        head = requests.head(f"{url}/api/tus/{item_id}", headers={**h, **TUS}, timeout=30)
        got[name, "tus head"] = (head.status_code, head.headers.get("Upload-Offset"))
        victim = item_for_write()
        chunk = {**h, **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        patch = requests.patch(f"{url}/api/tus/{victim}", data=b"\x00" * 4, headers=chunk, timeout=30)
        got[name, "tus patch"] = (patch.status_code, patch.headers.get("Upload-Offset"))
        victim = item_for_write()
        got[name, "tus delete"] = requests.delete(
            f"{url}/api/tus/{victim}", headers={**h, **TUS}, timeout=30
        ).status_code

    expected = {
        "list": {"anonymous": (401, None), "stranger": (200, False), "owner": (200, True), "staff": (200, True)},
        "detail": {"anonymous": 401, "stranger": 404, "owner": 200, "staff": 200},
        "create": {"anonymous": 401, "stranger": 201, "owner": 201, "staff": 201},
        "complete": {
            "anonymous": (401, "not_authenticated"),
            "stranger": (404, "not_found"),
            "owner": (409, "not_uploaded"),
            "staff": (409, "not_uploaded"),
        },
        "retry": {
            "anonymous": (401, "not_authenticated"),
            "stranger": (404, "not_found"),
            "owner": (409, "not_failed"),
            "staff": (409, "not_failed"),
        },
        "delete": {"anonymous": 401, "stranger": 404, "owner": 204, "staff": 204},
        "tus options": dict.fromkeys(CALLERS, 204),  # discovery, as tus wants it: no login, nothing about the item
        "tus create": {"anonymous": 401, "stranger": 201, "owner": 201, "staff": 201},
        "tus head": {"anonymous": (401, None), "stranger": (404, None), "owner": (200, "0"), "staff": (200, "0")},
        "tus patch": {"anonymous": (401, None), "stranger": (404, None), "owner": (204, "4"), "staff": (204, "4")},
        "tus delete": {"anonymous": 401, "stranger": 404, "owner": 204, "staff": 204},
    }
    actual = {call: {name: got[name, call] for name in CALLERS} for call in expected}
    assert actual == expected
    assert state(item_id) == before  # nothing a stranger or nobody sent reached the item


def test_a_foreign_or_malformed_id_is_404_with_the_same_body(asgi_server, callers):
    mine = pending_item(asgi_server, callers["owner"])["id"]
    h = callers["stranger"].headers
    answers = {
        requests.get(f"{asgi_server.url}/api/media/{item_id}", headers=h, timeout=30).text
        for item_id in (mine, str(uuid.uuid4()), "not-a-uuid")
    }
    assert answers == {'{"error":{"code":"not_found","message":"There is no such item."}}'}


# --- GraphQL over HTTP --------------------------------------------------------------------------

Q_ITEM = "query($id: ID!) { mediaItem(id: $id) { id processingStatus } }"
Q_ITEMS = "{ mediaItems(first: 100) { totalCount edges { node { id } } } }"
M_CREATE = 'mutation { createMediaUpload(fileName: "a.jpg", size: 5) { item { id } } }'
M_COMPLETE = "mutation($id: ID!) { completeMediaUpload(mediaId: $id) { id } }"
M_RETRY = "mutation($id: ID!) { retryMedia(mediaId: $id) { id } }"
M_CANCEL = "mutation($id: ID!) { cancelMedia(mediaId: $id) { mediaId } }"


def graphql(server: Any, caller: Caller, query: str, **variables: Any) -> Any:
    """The outcome of one operation: its data, or the code of its (single) error."""
    response = requests.post(
        f"{server.url}/graphql/",
        json={"query": query, "variables": variables},
        headers=caller.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    if body.get("errors"):
        return {e["extensions"]["code"] for e in body["errors"]}
    return body["data"]


def test_graphql_http_matrix(asgi_server, callers):
    owner = callers["owner"]
    item_id = pending_item(asgi_server, owner)["id"]
    before = state(item_id)
    got: dict[tuple[str, str], Any] = {}
    for name in CALLERS:
        caller = callers[name]
        victim = item_id if name in ("anonymous", "stranger") else pending_item(asgi_server, owner)["id"]
        item = graphql(asgi_server, caller, Q_ITEM, id=item_id)
        got[name, "mediaItem"] = item if isinstance(item, set) else item["mediaItem"]["id"] == item_id
        items = graphql(asgi_server, caller, Q_ITEMS)
        got[name, "mediaItems"] = (
            items if isinstance(items, set) else item_id in {e["node"]["id"] for e in items["mediaItems"]["edges"]}
        )
        created = graphql(asgi_server, caller, M_CREATE)
        got[name, "createMediaUpload"] = created if isinstance(created, set) else "created"
        got[name, "completeMediaUpload"] = graphql(asgi_server, caller, M_COMPLETE, id=item_id)
        got[name, "retryMedia"] = graphql(asgi_server, caller, M_RETRY, id=item_id)
        cancelled = graphql(asgi_server, caller, M_CANCEL, id=victim)
        got[name, "cancelMedia"] = cancelled if isinstance(cancelled, set) else "cancelled"

    unauthenticated = {"not_authenticated"}
    expected = {
        "mediaItem": {"anonymous": unauthenticated, "stranger": {"not_found"}, "owner": True, "staff": True},
        "mediaItems": {"anonymous": unauthenticated, "stranger": False, "owner": True, "staff": True},
        "createMediaUpload": {
            "anonymous": unauthenticated,
            "stranger": "created",
            "owner": "created",
            "staff": "created",
        },
        "completeMediaUpload": {
            "anonymous": unauthenticated,
            "stranger": {"not_found"},
            "owner": {"not_uploaded"},
            "staff": {"not_uploaded"},
        },
        "retryMedia": {
            "anonymous": unauthenticated,
            "stranger": {"not_found"},
            "owner": {"not_failed"},
            "staff": {"not_failed"},
        },
        "cancelMedia": {
            "anonymous": unauthenticated,
            "stranger": {"not_found"},
            "owner": "cancelled",
            "staff": "cancelled",
        },
    }
    actual = {op: {name: got[name, op] for name in CALLERS} for op in expected}
    assert actual == expected
    assert state(item_id) == before


# --- websockets: the GraphQL subscription and the two plain routes ------------------------------


async def _graphql_subscribe(server: Any, caller: Caller, item_id: str) -> Any:
    """graphql-transport-ws by hand: init, subscribe, then the first message (or the close)."""
    headers = {"Origin": server.url, **({"Cookie": caller.cookie} if caller.cookie else {})}
    async with websockets.connect(
        f"{server.ws_url}/graphql/", subprotocols=["graphql-transport-ws"], additional_headers=headers
    ) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ack["type"] == "connection_ack", ack
        query = "subscription($id: ID!) { mediaStatus(mediaId: $id) { id processingStatus } }"
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": {"id": item_id}}})
        )
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        # Execution errors come as a `next` with `errors`; request errors as an `error` message.
        errors = message["payload"] if message["type"] == "error" else message["payload"].get("errors")
        if errors:
            return {e["extensions"]["code"] for e in errors}
        assert message["type"] == "next", message
        return message["payload"]["data"]["mediaStatus"]["id"] == item_id


async def _status_socket(server: Any, caller: Caller, path: str, *, origin: str | None = None) -> Any:
    """A plain status websocket: the item ids of its snapshot, or the code it closed with."""
    headers = {"Origin": origin or server.url, **({"Cookie": caller.cookie} if caller.cookie else {})}
    try:
        async with websockets.connect(f"{server.ws_url}{path}", additional_headers=headers) as ws:
            ids: set[str] = set()
            try:
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 1.5))
                    ids.add(message["item"]["id"])
            except TimeoutError:
                return ids
            except websockets.ConnectionClosed as closed:
                return ("closed", closed.rcvd.code if closed.rcvd else None)
    except websockets.InvalidStatus as refused:
        return ("refused", refused.response.status_code)


def test_websocket_matrix(asgi_server, callers):
    owner = callers["owner"]
    item_id = pending_item(asgi_server, owner)["id"]
    staff_own = pending_item(asgi_server, callers["staff"])["id"]

    async def run() -> dict[tuple[str, str], Any]:
        # Every socket at once: an open one is read until 1.5 s of silence, and one after the
        # other that was ~9 s. Each is its own connection with its own caller's headers.
        evil = "https://evil.example"
        calls: dict[tuple[str, str], Any] = {}
        for name in CALLERS:
            caller = callers[name]
            calls[name, "mediaStatus"] = _graphql_subscribe(asgi_server, caller, item_id)
            calls[name, "/ws/media/<id>/"] = _status_socket(asgi_server, caller, f"/ws/media/{item_id}/")
            calls[name, "listed"] = _status_socket(asgi_server, caller, "/ws/media/")
        # A page on another site cannot use the owner's cookie (cross-site websocket hijacking).
        calls["owner", "cross-site item"] = _status_socket(asgi_server, owner, f"/ws/media/{item_id}/", origin=evil)
        calls["owner", "cross-site list"] = _status_socket(asgi_server, owner, "/ws/media/", origin=evil)
        got = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        for name in CALLERS:
            listed = got.pop((name, "listed"))
            got[name, "/ws/media/"] = listed if isinstance(listed, tuple) else item_id in listed
            if name == "staff":
                got["staff", "own list"] = staff_own in listed
        return got

    got = asyncio.run(run())
    expected = {
        "mediaStatus": {"anonymous": {"not_authenticated"}, "stranger": {"not_found"}, "owner": True, "staff": True},
        "/ws/media/<id>/": {
            "anonymous": ("closed", 4401),
            "stranger": ("closed", 4404),
            "owner": {item_id},
            "staff": {item_id},
        },
        # The list socket follows the caller's own items, staff included (they watch one by id).
        "/ws/media/": {"anonymous": ("closed", 4401), "stranger": False, "owner": True, "staff": False},
    }
    actual = {route: {name: got[name, route] for name in CALLERS} for route in expected}
    assert actual == expected
    assert got["owner", "cross-site item"] == got["owner", "cross-site list"] == ("refused", 403)
    assert got["staff", "own list"] is True


# --- signed URLs: the URL is the credential, for one object only --------------------------------


def _token(url: str) -> str:
    return url.rstrip("/").split("/api/", 1)[1].split("/")[1]


def _expired(salt: str, payload: dict[str, Any]) -> str:
    return signing.dumps({**payload, "e": int(time.time()) - 1}, salt=salt)


def test_presigned_put_serves_whoever_holds_it_for_its_own_item_only(asgi_server, callers):
    owner = callers["owner"]
    a, b = pending_item(asgi_server, owner, size=8), pending_item(asgi_server, owner, size=8)
    url_a = a["upload"]["url"]
    token_a = _token(url_a)
    b_before = state(b["id"])

    # A URL for A never writes B: not with B's id in the payload signed by someone else, not
    # edited, not expired, not a token made for another purpose.
    payload = signing.loads(token_a, salt=UPLOAD_SALT)
    forged = signing.dumps({**payload, "i": b["id"]}, salt=UPLOAD_SALT, key="a key that is not ours " * 3)
    edited = token_a[:-4] + ("AAAA" if not token_a.endswith("AAAA") else "BBBB")
    expired = _expired(UPLOAD_SALT, {**payload, "i": b["id"]})
    download_token = signing.dumps({**payload, "k": f"uploads/{b['id']}/source"}, salt=DOWNLOAD_SALT)
    refused = {}
    for label, token in [("forged", forged), ("edited", edited), ("expired", expired), ("purpose", download_token)]:
        response = requests.put(f"{asgi_server.url}/api/uploads/{token}", data=b"\x00" * 8, timeout=30)
        refused[label] = (response.status_code, code_of(response))
    assert refused == {
        "forged": (403, "url_invalid"),
        "edited": (403, "url_invalid"),
        "expired": (403, "url_expired"),
        "purpose": (403, "url_invalid"),
    }
    assert state(b["id"]) == b_before

    # Credentials are not what opens it: a stranger's token sent along changes nothing.
    with_stranger = requests.put(url_a, data=b"\xff\xd8\xff\xe0" + b"\x00" * 4, headers=callers["stranger"].headers)
    assert with_stranger.status_code in (200, 415), with_stranger.text  # stored, then judged by its content
    assert with_stranger.json().get("id", a["id"]) == a["id"]
    assert state(b["id"]) == b_before


def test_download_and_dash_urls_serve_one_item_whatever_the_path_says(asgi_server, callers):
    owner = callers["owner"]
    shared = {"dash/manifest.mpd": MANIFEST, "dash/init-0.m4s": b"A-init"}
    a = completed_item(owner.user, {"video.webm": b"A-video", **shared, "dash/chunk-0-1.m4s": b"A-chunk"})
    b = completed_item(owner.user, {"video.webm": b"B-video", **shared, "dash/only-b.m4s": b"B-only"})

    detail = {}
    for name in CALLERS:
        detail[name] = requests.get(f"{asgi_server.url}/api/media/{a.pk}", headers=callers[name].headers, timeout=30)
    assert {n: r.status_code for n, r in detail.items()} == {
        "anonymous": 401,
        "stranger": 404,
        "owner": 200,
        "staff": 200,
    }
    outputs = {o["role"]: o["url"] for o in detail["owner"].json()["outputs"]}
    video, manifest = outputs["video"], outputs["manifest"]
    dash_base = manifest.rsplit("/", 1)[0]

    # Whoever holds the URL gets that file, credentials or none (a player fetches it bare).
    for name in CALLERS:
        got = requests.get(video, headers=callers[name].headers, timeout=30)
        assert (got.status_code, got.content) == (200, b"A-video"), name
        got = requests.get(manifest, headers=callers[name].headers, timeout=30)
        assert (got.status_code, got.content) == (200, MANIFEST), name

    # A's DASH grant with B's file names in the path: A's folder only.
    assert requests.get(f"{dash_base}/init-0.m4s", timeout=30).content == b"A-init"
    assert requests.get(f"{dash_base}/only-b.m4s", timeout=30).status_code == 404
    for sneaky in ("..%2F..%2F" + f"{b.pk}%2Fdash%2Fonly-b.m4s", "%2e%2e", ".only-b.m4s", "..", "-x"):
        response = requests.get(f"{dash_base}/{sneaky}", timeout=30)
        assert response.status_code == 404 and b"B-only" not in response.content, sneaky

    # Download URLs: expired, edited, for another purpose, or signed with another key are refused.
    token = _token(video)
    grant = signing.loads(token, salt=DOWNLOAD_SALT)
    other_key = f"outputs/{b.pk}/video.webm"
    dash_token = _token(manifest)
    dash_grant = signing.loads(dash_token, salt=DASH_SALT)
    cases = {
        "expired": f"/api/files/{_expired(DOWNLOAD_SALT, grant)}",
        "edited": f"/api/files/{token[:-4]}{'AAAA' if not token.endswith('AAAA') else 'BBBB'}",
        "forged": "/api/files/" + signing.dumps({**grant, "k": other_key}, salt=DOWNLOAD_SALT, key="x" * 60),
        "dash as file": f"/api/files/{dash_token}",
        "file as dash": f"/api/dash/{token}/video.webm",
        "dash expired": f"/api/dash/{_expired(DASH_SALT, dash_grant)}/manifest.mpd",
        "dash forged": "/api/dash/"
        + signing.dumps({**dash_grant, "p": f"outputs/{b.pk}/dash/"}, salt=DASH_SALT, key="x" * 60)
        + "/only-b.m4s",
    }
    answers = {}
    for label, path in cases.items():
        response = requests.get(f"{asgi_server.url}{path}", timeout=30)
        answers[label] = (response.status_code, code_of(response))
        assert b"B-" not in response.content
    assert answers == {
        "expired": (403, "url_expired"),
        "edited": (403, "url_invalid"),
        "forged": (403, "url_invalid"),
        "dash as file": (403, "url_invalid"),
        "file as dash": (403, "url_invalid"),
        "dash expired": (403, "url_expired"),
        "dash forged": (403, "url_invalid"),
    }


def test_a_token_cannot_be_decoded_into_a_grant_for_another_item(asgi_server, callers):
    """The grant's payload is readable (signed, not encrypted) but not writable: swapping A's id for
    B's in the base64 part breaks the signature."""
    owner = callers["owner"]
    a, b = pending_item(asgi_server, owner, size=8), pending_item(asgi_server, owner, size=8)
    token = _token(a["upload"]["url"])
    payload, _, stamp_and_signature = token.partition(":")  # django.core.signing: payload:timestamp:signature
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert a["id"].encode() in raw  # readable...
    swapped = base64.urlsafe_b64encode(raw.replace(a["id"].encode(), b["id"].encode())).decode().rstrip("=")
    url = f"{asgi_server.url}/api/uploads/{swapped}:{stamp_and_signature}"
    response = requests.put(url, data=b"\x00" * 8, timeout=30)
    assert (response.status_code, code_of(response)) == (403, "url_invalid")  # ...but not writable
    assert state(b["id"])[3] == 0


def test_a_session_cookie_writes_only_with_its_csrf_token_and_a_bad_token_is_refused(asgi_server, callers):
    """A cookie rides along on a cross-site request; a token does not. So cookie writes need the
    CSRF token (REST and GraphQL alike), while a made-up or revoked token is refused outright."""
    owner = callers["owner"]
    url = asgi_server.url
    cookie = {"Cookie": owner.cookie, "Origin": url}
    body = {"file_name": "a.jpg", "size": 5}
    assert requests.get(f"{url}/api/media/", headers=cookie, timeout=30).status_code == 200
    refused = requests.post(f"{url}/api/media/", json=body, headers=cookie, timeout=30)
    assert (refused.status_code, code_of(refused)) == (403, "permission_denied")
    gql = requests.post(f"{url}/graphql/", json={"query": M_CREATE}, headers=cookie, timeout=30).json()
    assert {e["extensions"]["code"] for e in gql["errors"]} == {"permission_denied"}

    with requests.Session() as browser:  # as the page does: the csrftoken cookie sent back as a header
        browser.cookies.set("sessionid", owner.cookie.split("=", 1)[1])
        page = browser.get(f"{url}/", timeout=30)
        assert page.status_code == 200
        csrf = {"X-CSRFToken": browser.cookies["csrftoken"], "Referer": f"{url}/"}
        assert browser.post(f"{url}/api/media/", json=body, headers=csrf, timeout=30).status_code == 201

    for token in ("0" * 40, "not a token"):
        bad = {"Authorization": f"Token {token}"}
        response = requests.get(f"{url}/api/media/", headers=bad, timeout=30)
        assert (response.status_code, code_of(response)) == (401, "authentication_failed")
        gql = requests.post(f"{url}/graphql/", json={"query": Q_ITEMS}, headers=bad, timeout=30).json()
        assert {e["extensions"]["code"] for e in gql["errors"]} == {"authentication_failed"}
