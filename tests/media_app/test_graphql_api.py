"""GraphQL over HTTP in-process: the same services, codes, messages and ownership as REST.

Storage is a tmp dir and tasks are recorded (``sent``), as in test_api.py. Where a refusal has a
REST twin, the test asks both faces and compares code and message. The websocket (subscription)
flows against the live server and the real worker are in test_graphql_live.py.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.test import Client
from rest_framework.authtoken.models import Token

from media_app.models import MediaItem, MediaStatus
from media_app.services import (
    ErrorReport,
    media_item_create,
    media_item_store_source,
    renditions_replace,
)
from tests.media_app.test_api_support import HTML_AS_MP4, create, error_of, put
from tests.states import set_state

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("local_storage")]

ITEM_FIELDS = "id seq fileName kind processingStatus stage progress attempts error { code message } size createdAt"
CREATE = f"""
mutation($name: String!, $size: BigInt!, $type: String!) {{
  createMediaUpload(fileName: $name, size: $size, contentType: $type) {{
    uploadUrl expiresAt tusUrl item {{ {ITEM_FIELDS} }}
  }}
}}"""
COMPLETE = f"mutation($id: ID!) {{ completeMediaUpload(mediaId: $id) {{ {ITEM_FIELDS} }} }}"
RETRY = f"mutation($id: ID!) {{ retryMedia(mediaId: $id) {{ {ITEM_FIELDS} }} }}"
CANCEL = "mutation($id: ID!) { cancelMedia(mediaId: $id) { mediaId } }"
ITEM = f"query($id: ID!) {{ mediaItem(id: $id) {{ {ITEM_FIELDS} }} }}"


class Gql:
    """A GraphQL client over Django's test client; CSRF is enforced as for a browser."""

    def __init__(self, token: str | None = None) -> None:
        self.http = Client(enforce_csrf_checks=True)
        self.headers = {"Authorization": f"Token {token}"} if token else {}

    def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        response = self.http.post(
            "/graphql/", {"query": query, "variables": variables}, content_type="application/json", headers=self.headers
        )
        assert response.status_code == 200, response.content
        return dict(response.json())


@pytest.fixture
def gql(make_user):
    """``gql()`` -> (client with a real token, its user); ``gql(user)`` for a given user."""

    def make(user: Any = None, *, staff: bool = False) -> tuple[Gql, Any]:
        user = user or make_user(staff=staff)
        return Gql(Token.objects.get_or_create(user=user)[0].key), user

    return make


def error(body: dict[str, Any]) -> dict[str, Any]:
    """The one error of an answer: code from extensions, the sentence people read."""
    [err] = body["errors"]
    assert err["message"].endswith((".", ")")), err
    return {"code": err["extensions"]["code"], "message": err["message"]}


def create_upload(client: Gql, *, size: int, name: str = "clip.mp4", type: str = "video/mp4") -> dict[str, Any]:
    return client(CREATE, name=name, size=size, type=type)


# --- the workflow --------------------------------------------------------------------------------


def test_create_put_complete_queues_processing_once(gql, api, clip, sent, django_capture_on_commit_callbacks):
    client, user = gql()
    data = clip.read_bytes()
    body = create_upload(client, size=len(data))
    assert "errors" not in body, body
    created = body["data"]["createMediaUpload"]
    item = created["item"]
    assert (item["processingStatus"], item["progress"], item["size"], item["fileName"]) == (
        "Pending",
        0,
        len(data),
        "clip.mp4",
    )
    assert created["uploadUrl"].startswith("http://testserver/api/uploads/")
    assert created["tusUrl"] == f"http://testserver/api/tus/{item['id']}"
    assert created["expiresAt"] > item["createdAt"]

    rest, _ = api(user)
    assert put(rest, created["uploadUrl"], data).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        first = client(COMPLETE, id=item["id"])
        second = client(COMPLETE, id=item["id"])
    assert first["data"]["completeMediaUpload"]["processingStatus"] == "Pending"
    assert second["data"]["completeMediaUpload"]["id"] == item["id"]
    task_id = MediaItem.objects.get(pk=item["id"]).task_id
    assert sent.for_item(item["id"]) == [("media.process", [item["id"]], task_id)]


def test_sizes_beyond_32_bits_are_accepted(gql, settings):
    settings.UPLOAD_MAX_BYTES = settings.UPLOAD_QUOTA_BYTES = 10 * 1024**3
    client, _ = gql()
    body = create_upload(client, size=5 * 1024**3)
    assert body["data"]["createMediaUpload"]["item"]["size"] == 5 * 1024**3


# --- refusals: REST's codes and sentences --------------------------------------------------------


def test_too_large_and_quota_exceeded_match_rest(gql, api, settings, sent):
    settings.UPLOAD_MAX_BYTES = 1000
    client, user = gql()
    rest, _ = api(user)
    too_large = error(create_upload(client, size=1001))
    assert too_large["code"] == "too_large" and "1000 bytes" in too_large["message"]
    assert too_large == error_of(create(rest, size=1001))

    settings.UPLOAD_MAX_BYTES = 10**9
    settings.UPLOAD_QUOTA_BYTES = 10_000
    assert "errors" not in create_upload(client, size=6_000)
    quota = error(create_upload(client, size=5_000))
    assert quota["code"] == "quota_exceeded"
    assert quota == error_of(create(rest, size=5_000))
    assert MediaItem.objects.filter(owner=user).count() == 1
    assert sent.tasks == []


def test_creates_are_rate_limited_like_rest(gql, api, settings):
    settings.UPLOAD_CREATE_RATE = "2/minute"
    client, user = gql()
    rest, _ = api(user)
    assert "errors" not in create_upload(client, size=10)
    assert create(rest, size=10).status_code == 201  # one count for both faces
    limited = error(create_upload(client, size=10))
    assert limited["code"] == "rate_limited" and "try again in" in limited["message"]


def test_invalid_input_names_the_field(gql):
    client, _ = gql()
    invalid = error(create_upload(client, size=0))
    assert invalid["code"] == "invalid" and "size" in invalid["message"]
    # Not a number at all: GraphQL's own validation, before any resolver.
    body = client(CREATE, name="a.mp4", size="lots", type="")
    assert "BigInt" in body["errors"][0]["message"] and body.get("data") is None


def test_complete_and_retry_refusals(gql, sent, django_capture_on_commit_callbacks):
    client, _ = gql()
    item = create_upload(client, size=100)["data"]["createMediaUpload"]["item"]
    not_uploaded = error(client(COMPLETE, id=item["id"]))
    assert not_uploaded == {"code": "not_uploaded", "message": "No bytes have been uploaded for this item yet."}
    assert error(client(RETRY, id=item["id"]))["code"] == "not_failed"

    wrong = create_upload(client, size=len(HTML_AS_MP4))["data"]["createMediaUpload"]["item"]
    source = MediaItem.objects.get(pk=wrong["id"])
    media_item_store_source(item=source, fileobj=io.BytesIO(HTML_AS_MP4))
    with django_capture_on_commit_callbacks(execute=True):
        refused = error(client(COMPLETE, id=wrong["id"]))
    assert refused == {
        "code": "unsupported_type",
        "message": "The file is not a video, audio or image file we can read.",
    }
    failed = client(ITEM, id=wrong["id"])["data"]["mediaItem"]
    assert failed["processingStatus"] == "Failed" and failed["error"]["code"] == "invalid_input"
    assert sent.tasks == []


def test_retry_sends_a_failed_item_back_to_pending(gql, clip, sent, django_capture_on_commit_callbacks):
    client, user = gql()
    item = media_item_create(owner=user, original_name="a.mp4", size=clip.stat().st_size)
    media_item_store_source(item=item, fileobj=clip.open("rb"))
    set_state(item_id=item.pk, status=MediaStatus.FAILED, attempts=3, error=ErrorReport("timeout", "Too slow."))
    with django_capture_on_commit_callbacks(execute=True):
        body = client(RETRY, id=str(item.pk))
    retried = body["data"]["retryMedia"]
    assert (retried["processingStatus"], retried["error"], retried["attempts"]) == ("Pending", None, 0)
    assert len(sent.for_item(item.pk)) == 1


def test_cancel_deletes_the_item_and_its_bytes(gql, api, clip, sent):
    client, user = gql()
    rest, _ = api(user)
    data = clip.read_bytes()
    created = create_upload(client, size=len(data))["data"]["createMediaUpload"]
    put(rest, created["uploadUrl"], data)
    key = MediaItem.objects.get(pk=created["item"]["id"]).source_key
    assert default_storage.exists(key)
    assert client(CANCEL, id=created["item"]["id"])["data"]["cancelMedia"] == {"mediaId": created["item"]["id"]}
    assert not MediaItem.objects.filter(pk=created["item"]["id"]).exists() and not default_storage.exists(key)
    assert error(client(ITEM, id=created["item"]["id"]))["code"] == "not_found"


# --- authentication and ownership ----------------------------------------------------------------


def test_anonymous_and_bad_tokens_are_refused_like_rest():
    anonymous = error(Gql()(ITEM, id="00000000-0000-0000-0000-000000000000"))
    assert anonymous == {"code": "not_authenticated", "message": "Log in or send an `Authorization: Token …` header."}
    bad = error(Gql("not-a-token")(ITEM, id="00000000-0000-0000-0000-000000000000"))
    assert bad["code"] == "authentication_failed"
    assert "errors" in Gql()(CREATE, name="a.mp4", size=10, type="") and not MediaItem.objects.exists()


def test_session_posts_need_the_csrf_token_and_token_posts_do_not(make_user, settings):
    user = make_user()
    browser = Gql()
    browser.http.force_login(user)
    refused = error(create_upload(browser, size=10))
    assert refused["code"] == "permission_denied" and "CSRF" in refused["message"]
    assert not MediaItem.objects.exists()

    settings.DEBUG = True  # GraphiQL's page hands out the CSRF cookie it then sends back
    page = browser.http.get("/graphql/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and b"graphiql" in page.content.lower()
    browser.headers = {"X-CSRFToken": browser.http.cookies["csrftoken"].value}
    assert create_upload(browser, size=10)["data"]["createMediaUpload"]["item"]["processingStatus"] == "Pending"
    # Reads are safe requests: no CSRF token needed.
    assert "errors" not in Client().get("/graphql/", {"query": "{ __typename }"}).json()


def test_graphiql_is_served_only_in_debug(settings):
    settings.DEBUG = False
    assert Client().get("/graphql/", headers={"Accept": "text/html"}).status_code == 404


def test_foreign_and_malformed_ids_are_not_found_everywhere_and_staff_see_all(gql):
    owner_client, _ = gql()
    item = create_upload(owner_client, size=10)["data"]["createMediaUpload"]["item"]
    stranger, _ = gql()
    for query in (ITEM, COMPLETE, RETRY, CANCEL):
        for media_id in (item["id"], "not-a-uuid", "00000000-0000-0000-0000-000000000000"):
            assert error(stranger(query, id=media_id)) == {"code": "not_found", "message": "There is no such item."}
    assert MediaItem.objects.filter(pk=item["id"]).exists()
    staff, _ = gql(staff=True)
    assert staff(ITEM, id=item["id"])["data"]["mediaItem"]["id"] == item["id"]


def test_items_are_paged_by_cursor_and_filtered(gql):
    client, _ = gql()
    gql()[0](CREATE, name="other.mp4", size=5, type="")  # someone else's
    ids = [create_upload(client, size=10, name=f"{i}.mp4")["data"]["createMediaUpload"]["item"]["id"] for i in range(5)]
    done = MediaItem.objects.get(pk=ids[0])
    set_state(item_id=done.pk, status=MediaStatus.COMPLETED, extra={"kind": "video"})
    key = f"outputs/{done.pk}/video.webm"
    default_storage.save(key, io.BytesIO(b"webm"))
    renditions_replace(
        item_id=done.pk,
        renditions=[{"role": "video", "storage_key": key, "content_type": "video/webm", "codec": "av1", "bytes": 4}],
    )
    page = """query($after: String, $status: ProcessingStatus, $kind: MediaKind) {
      mediaItems(first: 2, after: $after, status: $status, kind: $kind) {
        totalCount pageInfo { hasNextPage endCursor }
        edges { cursor node { id processingStatus outputs { kind url contentType codec bytes } } }
      }
    }"""
    seen, after = [], None
    while True:
        body = client(page, after=after)["data"]["mediaItems"]
        assert body["totalCount"] == 5
        seen += [edge["node"]["id"] for edge in body["edges"]]
        if not body["pageInfo"]["hasNextPage"]:
            break
        after = body["pageInfo"]["endCursor"]
    assert seen == ids[::-1]

    completed = client(page, status="Completed", kind="video")["data"]["mediaItems"]
    [edge] = completed["edges"]
    [out] = edge["node"]["outputs"]
    assert (out["kind"], out["contentType"], out["codec"], out["bytes"]) == ("video", "video/webm", "av1", 4)
    assert out["url"].startswith("http://testserver/api/files/")
    assert client(page, status="Failed")["data"]["mediaItems"]["totalCount"] == 0
    assert error(client(page, after="garbage"))["code"] == "invalid"


def test_subscriptions_are_refused_over_http(gql):
    client, _ = gql()
    response = client.http.post(
        "/graphql/",
        {"query": 'subscription { mediaStatus(mediaId: "x") { id } }'},
        content_type="application/json",
        headers=client.headers,
    )
    assert response.status_code == 200
    assert error(response.json()) == {
        "code": "websocket_required",
        "message": "Subscribe over the graphql-transport-ws websocket at /graphql/.",
    }
