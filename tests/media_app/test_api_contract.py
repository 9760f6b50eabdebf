"""The OpenAPI schema is the API's exact contract, and Swagger UI shows it from our own files.

The main test runs schemathesis (its CLI, every check, all four phases, stateful links between
create, presigned PUT, tus, complete, retry and delete) against a live uvicorn. The others pin
what the fuzzer found once, so a regression names itself: a number taken as a file name, an
undocumented answer, a page object documented as a list.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import pytest
import requests
import schemathesis
from django.conf import settings
from django.core.cache import caches
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from media_app.models import MediaItem
from media_app.services import media_item_create
from tests.conftest import AsgiServer
from tests.env_plugin import ROOT, RUN_DIR
from tests.media_app.test_authz_matrix import completed_item

pytestmark = pytest.mark.django_db(transaction=True)

# What the fuzzer's run may take; the whole test stays under two minutes on two cores.
MAX_EXAMPLES = 12
SEED = 20


def schema(client: APIClient | None = None) -> dict[str, Any]:
    response = (client or APIClient()).get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return json.loads(response.content)


def token_for(user: Any) -> str:
    return Token.objects.get_or_create(user=user)[0].key


# --- the schema covers the API ----------------------------------------------------------------


def _api_routes() -> set[str]:
    """Every URL pattern under /api/ as an OpenAPI path template."""
    found: set[str] = set()

    def walk(patterns: list[Any], prefix: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                walk(p.url_patterns, route)
            elif isinstance(p, URLPattern) and route.startswith("api/"):
                found.add("/" + route.replace("<str:", "{").replace("<", "{").replace(">", "}"))

    walk(get_resolver().url_patterns, "")
    return found - {"/api/schema/", "/api/docs/"}


def test_every_api_route_and_method_is_in_the_schema():
    paths = schema()["paths"]
    assert _api_routes() == set(paths)
    methods = {path: set(item) for path, item in paths.items()}
    assert methods["/api/tus/"] == {"options", "post"}
    assert methods["/api/tus/{item_id}"] == {"options", "head", "patch", "delete"}
    assert methods["/api/uploads/{token}"] == {"put"}
    assert methods["/api/files/{token}"] == methods["/api/dash/{token}/{name}"] == {"get", "head"}
    assert methods["/api/media/{item_id}"] == {"get", "delete"}


def test_every_operation_documents_its_refusals_with_the_error_body():
    paths = schema()["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            answers = operation["responses"]
            secured = operation.get("security") != [{}]
            if secured:
                assert "401" in answers, (method, path)
                assert "WWW-Authenticate" in answers["401"]["headers"]
            for status, answer in answers.items():
                assert answer["description"], (method, path, status)
                if status.startswith("4") and method != "head":
                    body = answer["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/ErrorOutput"}, (method, path, status)
    create = paths["/api/media/"]["post"]["responses"]
    assert {"201", "400", "401", "403", "413", "415", "429"} <= set(create)
    assert create["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    listed = paths["/api/media/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed == {"$ref": "#/components/schemas/MediaPageOutput"}


def test_the_list_answers_the_documented_page_object(make_user):
    client = APIClient()
    client.force_authenticate(make_user())
    page = client.get("/api/media/").json()
    documented = schema()["components"]["schemas"]["MediaPageOutput"]
    assert set(page) == set(documented["properties"]) == set(documented["required"])
    assert page == {"count": 0, "next": None, "previous": None, "results": []}


def test_answers_the_fuzzer_cannot_reach_are_the_documented_ones(asgi_server, make_user):
    """A fuzzer makes no real media file, so it never sees a Completed item, a stored upload or a
    served file: those answers are checked against the schema here, from the live server."""
    raw = requests.get(f"{asgi_server.url}/api/schema/", headers={"Accept": "application/vnd.oai.openapi+json"})
    described = raw.json()
    api = schemathesis.openapi.from_dict(described)
    user = make_user()
    auth = {"Authorization": f"Token {token_for(user)}"}
    url = asgi_server.url

    def check(path: str, method: str, response: requests.Response, status: int) -> requests.Response:
        assert response.status_code == status, (method, path, response.text[:300])
        assert str(status) in described["paths"][path][method.lower()]["responses"], (method, path, status)
        api[path][method].validate_response(response)  # the body (and its type) against the schema
        return response

    photo = _jpeg()
    body = {"file_name": "photo.jpg", "size": len(photo), "content_type": "image/jpeg"}
    created = check("/api/media/", "POST", requests.post(f"{url}/api/media/", json=body, headers=auth), 201).json()
    check("/api/media/{item_id}", "GET", requests.get(f"{url}/api/media/{created['id']}", headers=auth), 200)
    check("/api/uploads/{token}", "PUT", requests.put(created["upload"]["url"], data=photo), 200)
    check(
        "/api/media/{item_id}/retry", "POST", requests.post(f"{url}/api/media/{created['id']}/retry", headers=auth), 409
    )

    tus = {**auth, "Tus-Resumable": "1.0.0"}
    meta = "filename " + base64.b64encode(b"song.flac").decode()
    made = check(
        "/api/tus/",
        "POST",
        requests.post(f"{url}/api/tus/", headers={**tus, "Upload-Length": "8", "Upload-Metadata": meta}),
        201,
    )
    location = made.headers["Location"]
    chunk = {**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    check("/api/tus/{item_id}", "PATCH", requests.patch(location, data=b"fLaC", headers=chunk), 204)
    check("/api/tus/{item_id}", "HEAD", requests.head(location, headers=tus), 200)
    check("/api/tus/{item_id}", "PATCH", requests.patch(location, data=b"x", headers=chunk), 409)
    check("/api/tus/{item_id}", "OPTIONS", requests.options(location), 204)
    check("/api/tus/", "OPTIONS", requests.options(f"{url}/api/tus/"), 204)
    check("/api/tus/{item_id}", "DELETE", requests.delete(location, headers=tus), 204)
    check("/api/tus/{item_id}", "HEAD", requests.head(location, headers=tus), 404)

    done = completed_item(user, {"video.webm": b"webm" * 100, "dash/manifest.mpd": b"<MPD/>", "dash/init-0.m4s": b"i"})
    failed = media_item_create(owner=user, original_name="bad.jpg", size=3)
    MediaItem.objects.filter(pk=failed.pk).update(status="Failed", error_code="invalid_input", error_message="Damaged.")
    detail = check("/api/media/{item_id}", "GET", requests.get(f"{url}/api/media/{done.pk}", headers=auth), 200).json()
    check("/api/media/{item_id}", "GET", requests.get(f"{url}/api/media/{failed.pk}", headers=auth), 200)
    check("/api/media/", "GET", requests.get(f"{url}/api/media/?page_size=1", headers=auth), 200)
    check("/api/media/", "GET", requests.get(f"{url}/api/media/?page=99", headers=auth), 404)
    outputs = {o["role"]: o["url"] for o in detail["outputs"]}
    check("/api/files/{token}", "GET", requests.get(outputs["video"]), 200)
    check("/api/files/{token}", "GET", requests.get(outputs["video"], headers={"Range": "bytes=0-9"}), 206)
    check("/api/files/{token}", "GET", requests.get(outputs["video"], headers={"Range": "bytes=9999-"}), 416)
    check("/api/files/{token}", "HEAD", requests.head(outputs["video"]), 200)
    check("/api/dash/{token}/{name}", "GET", requests.get(outputs["manifest"]), 200)
    check("/api/dash/{token}/{name}", "GET", requests.get(outputs["manifest"].rsplit("/", 1)[0] + "/init-0.m4s"), 200)
    check("/api/dash/{token}/{name}", "GET", requests.get(outputs["manifest"].rsplit("/", 1)[0] + "/nope.m4s"), 404)
    check("/api/media/{item_id}", "DELETE", requests.delete(f"{url}/api/media/{done.pk}", headers=auth), 204)
    check("/api/media/{item_id}", "GET", requests.get(f"{url}/api/media/{done.pk}", headers=auth), 404)
    check("/api/media/{item_id}", "GET", requests.get(f"{url}/api/media/{done.pk}"), 401)


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(out, "JPEG")
    return out.getvalue()


# --- the server refuses what the schema refuses -------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"file_name": 0, "size": 10},
        {"file_name": 1.5, "size": 10},
        {"file_name": ["a.mp4"], "size": 10},
        {"file_name": "", "size": 10},
        {"file_name": "a.mp4", "size": "10"},
        {"file_name": "a.mp4", "size": 10.0},
        {"file_name": "a.mp4", "size": True},
        {"file_name": "a.mp4", "size": 10, "content_type": 5},
        {"file_name": "a.mp4", "size": 10, "content_type": None},
        ["a.mp4", 10],
    ],
)
def test_create_refuses_what_the_schema_refuses(make_user, body):
    client = APIClient()
    client.force_authenticate(make_user())
    response = client.post("/api/media/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize(
    "query",
    ["status=", "kind=", "status=done", "page=0", "page=x", "page_size=0", "page_size=101", "kind=video&kind=audio"],
)
def test_the_list_refuses_a_query_the_schema_refuses(make_user, query):
    client = APIClient()
    client.force_authenticate(make_user())
    response = client.get(f"/api/media/?{query}")
    assert response.status_code == 400, (query, response.content)


def test_the_create_rate_by_default_lets_a_camera_roll_through(asgi_server, make_user):
    """150 creates from one user in a few seconds (8 client threads) are all accepted.

    Each item is deleted right after, as a client that finishes its uploads frees its place:
    the number of unfinished uploads (10) is the limit that holds a client back, with a test
    of its own; the rate limit only stops a runaway one.
    """
    assert settings.UPLOAD_CREATE_RATE == "600/minute"  # the shipped default, in the server too
    user = make_user()
    caches["uploads"].delete(f"throttle_upload_create_{user.pk}")  # ids repeat within a run
    auth = {"Authorization": f"Token {token_for(user)}"}

    def create_and_delete(i: int) -> str:
        with requests.Session() as http:
            body = {"file_name": f"IMG_{i:04}.jpg", "size": 1000, "content_type": "image/jpeg"}
            created = http.post(f"{asgi_server.url}/api/media/", json=body, headers=auth, timeout=30)
            if created.status_code != 201:
                return f"{created.status_code} {created.text}"
            http.delete(f"{asgi_server.url}/api/media/{created.json()['id']}", headers=auth, timeout=30)
            return "201"

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create_and_delete, range(150)))
    elapsed = time.monotonic() - started
    assert answers == ["201"] * 150, {code: answers.count(code) for code in set(answers)}
    assert elapsed < 60


def test_a_throttled_create_says_when_to_come_back_and_the_schema_documents_it(api_client_factory, settings):
    settings.UPLOAD_CREATE_RATE = "2/minute"
    client, user = api_client_factory()
    caches["uploads"].delete(f"throttle_upload_create_{user.pk}")
    answers = [client.post("/api/media/", {"file_name": "a.jpg", "size": 5}, format="json") for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429]
    assert 0 < int(answers[2]["Retry-After"]) <= 60
    assert answers[2].json()["error"]["code"] == "rate_limited"


@pytest.fixture
def api_client_factory(make_user):
    def make() -> tuple[APIClient, Any]:
        user = make_user()
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
        return client, user

    return make


# --- Swagger UI, from our own files -----------------------------------------------------------


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def test_swagger_ui_is_served_with_every_script_and_stylesheet_from_this_site(asgi_server):
    page = requests.get(f"{asgi_server.url}/api/docs/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assets = _Assets()
    assets.feed(page.text)
    assert len(assets.urls) >= 3  # bundle, preset, stylesheet (and the icon)
    for url in assets.urls:
        absolute = urljoin(page.url, url)
        assert urlparse(absolute).netloc == urlparse(asgi_server.url).netloc, url
        assert requests.get(absolute, timeout=30).status_code == 200, url
    assert "swagger-ui-bundle.js" in page.text
    assert '"validatorUrl": null' in page.text  # no call to validator.swagger.io either
    assert "http://" not in page.text.replace(asgi_server.url, "") and "https://" not in page.text
    described = requests.get(f"{asgi_server.url}/api/schema/", timeout=30)
    assert described.status_code == 200 and "/api/tus/{item_id}" in described.text


# --- schemathesis against a live server ---------------------------------------------------------

# Statuses that answer a request the schema allows but the server's state or rules refuse: a
# fuzzer cannot know that an upload is already complete (409), that its bytes are not an image
# (415) or that a lock is held (423). Every one is documented for its operation.
POSITIVE_REFUSALS = ["401", "403", "404", "409", "410", "413", "415", "423", "429"]
# schemathesis' defaults plus what tus 1.0 prescribes for a wrong Tus-Resumable (412) and a too
# large Upload-Length (413), and 416 for a range past the end.
NEGATIVE_REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "412", "413", "415", "416", "422", "428", "429"]

CONFIG = f"""
[phases.stateful]
max-steps = 12
[checks.positive_data_acceptance]
expected-statuses = ["2xx", {", ".join(f'"{s}"' for s in POSITIVE_REFUSALS)}]
[checks.negative_data_rejection]
expected-statuses = [{", ".join(f'"{s}"' for s in NEGATIVE_REFUSALS)}]
[checks.missing_required_header]
expected-statuses = ["400", "401", "403", "406", "412", "415", "422"]
"""


@pytest.fixture(scope="module")
def fuzz_server(django_db_setup: None, django_db_blocker: Any) -> Iterator[AsgiServer]:
    """The live server exactly as conftest starts it, with the per-user limits raised.

    The fuzzer creates hundreds of items as one user; under the shipped limits (10 unfinished
    uploads) every create after the tenth would be a 429 and the stateful phase would stop at
    its first step. The limits themselves have tests of their own.
    """
    raised = {
        "UPLOAD_MAX_UNFINISHED": "100000",
        "UPLOAD_QUOTA_BYTES": str(10**18),
        "UPLOAD_CREATE_RATE": "100000/minute",
    }
    saved = {name: os.environ.get(name) for name in raised}
    with django_db_blocker.unblock():
        server = AsgiServer(RUN_DIR / "logs" / "asgi-contract.log")
        os.environ.update(raised)
        try:
            server.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    yield server
    server.stop()


def test_schemathesis_finds_the_server_true_to_its_schema(fuzz_server, make_user, tmp_path):
    alice, bob = make_user(), make_user()
    auth = tmp_path / "wfc-auth.json"
    # Two users: schemathesis' object-level check reads one user's items as the other.
    auth.write_text(
        json.dumps(
            {
                "auth": [
                    {
                        "name": user.username,
                        "fixedHeaders": [{"name": "Authorization", "value": f"Token {token_for(user)}"}],
                    }
                    for user in (alice, bob)
                ]
            }
        )
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report = tmp_path / "report"
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{fuzz_server.url}/api/schema/",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--phases",
            "examples,coverage,fuzzing,stateful",
            # WHIP's body is an SDP offer from a WebRTC stack: no fuzzer makes one (any other text
            # is a 400). tests/media_app/test_whip.py drives it with a real peer instead.
            "--exclude-tag",
            "whip",
            "--auth-wfc",
            str(auth),
            "--workers",
            "2",
            "--no-color",
            "--report",
            "ndjson",
            "--report-dir",
            str(report),
        ],
        cwd=tmp_path,  # where schemathesis and hypothesis keep their caches
        env={**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.media_app.schemathesis_hooks"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - started
    summary = proc.stdout[proc.stdout.rfind("SUMMARY") :]
    print(proc.stdout[-8000:])  # shown with -s or on failure: the run's summary and warnings
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    assert f"Tested: {_operation_count()}" in summary, summary
    assert elapsed < 120, f"the contract run took {elapsed:.0f} s"


def _operation_count() -> int:
    """Every operation but WHIP's, which the run leaves out (`--exclude-tag whip`)."""
    operations = [op for item in schema()["paths"].values() for op in item.values()]
    return sum("whip" not in op.get("tags", []) for op in operations)
