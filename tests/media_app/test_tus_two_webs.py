"""tus uploads whose PATCHes land on different web machines (issue 14).

Two live uvicorn processes, each with a DATA_DIR of its own (its own MEDIA_ROOT, staging and
work directories, as two machines have), sharing only what web machines share: the database,
Redis and one S3 bucket (moto in server mode). An upload's chunks alternate between them, with a
PATCH cut off on one and resumed from the other's HEAD; the object in the bucket must be the
file, byte for byte. The local-storage fast path (one machine, one disk) gets the same upload.
Processing is not this test's concern: the item must end queued, which the web's part is.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock
from urllib.parse import urlparse

import pytest
import requests
from django.core.files.storage import default_storage

from media_app import uploads
from media_app.models import MediaItem, MediaStatus
from tests import conftest
from tests.conftest import AsgiServer
from tests.env_plugin import RUN_DIR
from tests.media_app.test_tus_live import dropped_patch, padded_video, token_for

if TYPE_CHECKING:
    from tests.s3 import MotoServer

pytest_plugins = ["tests.s3", "tests.media_app.test_api_support"]

MB = 1 << 20
SIZE = 24 * MB + 12345
# Chunk sizes in order, alternating between the two web processes: tails that build up below
# S3's 5 MiB part floor, a chunk that is cut into parts, a tail after parts, and the rest.
CHUNKS = [MB, MB, 5 * MB // 2, 14 * MB, MB]
TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


class WebHost(AsgiServer):
    """A live web process as on a machine of its own: the run's environment plus ``env``."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        super().__init__(log)
        self.env = env

    def start(self) -> None:
        run_env = conftest._subprocess_env
        with mock.patch.object(conftest, "_subprocess_env", lambda: {**run_env(), **self.env}):
            super().start()


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer) -> str:
    name = f"webs-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def two_webs(django_db_setup: None, django_db_blocker: Any, moto_server: MotoServer, bucket: str) -> Iterator[list]:
    """Web processes "a" and "b": separate disks, one database, Redis and bucket. Their broker
    is in-memory: nothing here consumes tasks, and the run's worker must not take an item
    whose source it cannot read (it has local storage)."""
    from tests.s3 import CREDENTIALS, REGION  # a plugin of this module: imported once pytest has it

    shared = {
        "STORAGE_BACKEND": "s3",
        "AWS_STORAGE_BUCKET_NAME": bucket,
        "AWS_S3_ENDPOINT_URL": moto_server.url,
        "AWS_S3_REGION_NAME": REGION,
        **CREDENTIALS,
        "DJANGO_SECRET_KEY": uuid.uuid4().hex * 2,  # web machines share it (signed URLs)
        "CELERY_BROKER_URL": "memory://",
    }
    webs = []
    with django_db_blocker.unblock():
        for name in ("a", "b"):
            data_dir = RUN_DIR / f"web-{name}"
            web = WebHost(RUN_DIR / "logs" / f"web-{name}.log", {**shared, "DATA_DIR": str(data_dir)})
            web.data_dir = data_dir  # type: ignore[attr-defined]
            web.start()
            webs.append(web)
    yield webs
    for web in webs:
        web.stop()


@pytest.fixture(scope="module")
def video(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return padded_video(clip, tmp_path_factory.mktemp("webs") / "video.mp4", SIZE)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def on(web: AsgiServer, url: str) -> str:
    """The same upload URL, sent to ``web``, as a load balancer would."""
    return url.replace(urlparse(url).netloc, urlparse(web.url).netloc)


def upload_alternating(webs: list, key: str, data: bytes) -> str:
    """Create on the first web process, PATCH in CHUNKS alternating between them with one PATCH
    cut off and resumed from the other's HEAD, then the rest; returns the item id."""
    auth = {"Authorization": f"Token {key}"}
    created = requests.post(
        f"{webs[0].url}/api/tus/", headers={**auth, **TUS, "Upload-Length": str(len(data))}, timeout=30
    )
    assert created.status_code == 201, created.text
    url = created.headers["Location"]
    offset = 0
    for n, size in enumerate([*CHUNKS, len(data) - sum(CHUNKS)]):
        web, other = webs[n % len(webs)], webs[(n + 1) % len(webs)]
        chunk = data[offset : offset + size]
        if n == 2:
            # The connection drops after half the chunk; the client asks the other one where to go on.
            dropped_patch(on(web, url), key, offset, chunk, send=len(chunk) // 2)
            head = requests.head(on(other, url), headers={**auth, **TUS}, timeout=30)
            assert head.status_code == 200 and int(head.headers["Upload-Offset"]) == offset
        answer = requests.patch(
            on(web, url), data=chunk, headers={**auth, **PATCH, "Upload-Offset": str(offset)}, timeout=60
        )
        assert answer.status_code == 204, (n, answer.status_code, answer.text)
        offset += len(chunk)
        assert int(answer.headers["Upload-Offset"]) == offset
    return url.rsplit("/", 1)[1]


def assert_queued(item_id: str) -> MediaItem:
    item = MediaItem.objects.get(pk=item_id)
    assert item.status == MediaStatus.PENDING and item.queued_at and item.task_id, item.error_message
    assert item.detected_content_type == "video/mp4" and item.upload_parts == {}
    return item


@pytest.mark.django_db(transaction=True)
def test_a_tus_upload_alternating_between_two_web_machines_lands_whole_in_s3(
    two_webs, bucket, moto_server, make_user, video
):
    data = video.read_bytes()
    item_id = upload_alternating(two_webs, token_for(make_user()), data)

    s3 = moto_server.client()
    stored = s3.get_object(Bucket=bucket, Key=f"uploads/{item_id}/source")["Body"].read()
    assert len(stored) == len(data) and sha256(stored) == sha256(data)
    # No tail object and no open multipart upload is left behind.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"uploads/{item_id}/")["Contents"]
    assert [obj["Key"] for obj in listed] == [f"uploads/{item_id}/source"]
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=f"uploads/{item_id}/").get("Uploads", []) == []
    # Neither machine's disk held a byte of it.
    for web in two_webs:
        assert not [p for p in web.data_dir.rglob("*") if item_id in str(p)], web.data_dir
    assert_queued(item_id)


@pytest.mark.django_db(transaction=True)
def test_the_same_upload_on_local_storage_appends_in_place(asgi_server, make_user, video):
    data = video.read_bytes()
    item_id = upload_alternating([asgi_server], token_for(make_user()), data)

    with default_storage.open(f"uploads/{item_id}/source", "rb") as fh:
        assert sha256(fh.read()) == sha256(data)
    staging = Path(os.environ["DATA_DIR"]) / "uploads-partial"
    assert not staging.exists() or not [p for p in staging.iterdir() if item_id in p.name]
    item = MediaItem.objects.get(pk=item_id)
    assert item.upload_finished_at and item.task_id  # queued (the run's worker may have started it)


@pytest.mark.django_db
def test_parts_and_tails_a_dead_patch_left_in_s3_are_not_counted(
    api, s3_storage, sent, video, monkeypatch, django_capture_on_commit_callbacks
):
    """A web process that dies after storing a part and a longer tail, but before recording them,
    leaves S3 ahead of the database: the offset stays where it was, the resumed PATCH overwrites
    what it must, and the file assembled is the one sent."""
    client, _ = api()
    data = video.read_bytes()
    url = client.post("/api/tus/", HTTP_UPLOAD_LENGTH=str(len(data)), HTTP_TUS_RESUMABLE="1.0.0")["Location"]
    item_id = url.rsplit("/", 1)[1]

    def patch(offset: int, chunk: bytes) -> Any:
        return client.generic(
            "PATCH",
            url,
            chunk,
            content_type="application/offset+octet-stream",
            HTTP_UPLOAD_OFFSET=str(offset),
            HTTP_TUS_RESUMABLE="1.0.0",
        )

    assert patch(0, data[: 3 * MB]).status_code == 204  # a 3 MiB tail

    def die(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("the web process died before recording the PATCH")

    with monkeypatch.context() as patched:
        patched.setattr(uploads, "_record", die)
        with pytest.raises(SystemExit):  # one that grew the tail object to 4 MiB
            patch(3 * MB, data[3 * MB : 4 * MB])
        with pytest.raises(SystemExit):  # one that stored two parts (8 + 12 MiB)
            patch(3 * MB, b"\xff" * (17 * MB))
    assert len(s3_storage.get(f"uploads/{item_id}/source.tail-0")) == 4 * MB
    assert len(s3_storage.client.list_parts(**_upload_of(s3_storage, item_id))["Parts"]) == 2
    assert client.head(url, HTTP_TUS_RESUMABLE="1.0.0")["Upload-Offset"] == str(3 * MB)

    assert patch(3 * MB, data[3 * MB : 7 * MB]).status_code == 204
    with django_capture_on_commit_callbacks(execute=True):
        assert patch(7 * MB, data[7 * MB :]).status_code == 204
    assert sha256(s3_storage.get(f"uploads/{item_id}/source")) == sha256(data)
    assert s3_storage.keys(f"uploads/{item_id}/") == [f"uploads/{item_id}/source"]
    assert len(sent.for_item(item_id)) == 1
    # The dead PATCH's multipart upload, recorded nowhere, goes with the hourly expiry job.
    uploads.uploads_expire()
    assert s3_storage.client.list_multipart_uploads(Bucket=s3_storage.name).get("Uploads", []) == []


def _upload_of(s3_storage: Any, item_id: str) -> dict[str, str]:
    uploads_open = s3_storage.client.list_multipart_uploads(Bucket=s3_storage.name)["Uploads"]
    (upload,) = [u for u in uploads_open if u["Key"] == f"uploads/{item_id}/source"]
    return {"Bucket": s3_storage.name, "Key": upload["Key"], "UploadId": upload["UploadId"]}


@pytest.mark.django_db
def test_delete_and_expiry_abort_the_multipart_upload_and_drop_the_tail(api, s3_storage, video, settings):
    """An upload stopped midway holds a multipart upload (its parts are billed storage that no
    listing shows) and a tail object: DELETE and the expiry job remove both."""
    client, _ = api()
    data = video.read_bytes()[: 7 * MB]
    urls = []
    for _ in range(2):
        url = client.post("/api/tus/", HTTP_UPLOAD_LENGTH=str(SIZE), HTTP_TUS_RESUMABLE="1.0.0")["Location"]
        for offset, end in ((0, 6 * MB), (6 * MB, 7 * MB)):  # a 6 MiB part, then a 1 MiB tail
            answer = client.generic(
                "PATCH",
                url,
                data[offset:end],
                content_type="application/offset+octet-stream",
                HTTP_UPLOAD_OFFSET=str(offset),
                HTTP_TUS_RESUMABLE="1.0.0",
            )
            assert answer.status_code == 204
        urls.append(url)
    deleted, idle = (url.rsplit("/", 1)[1] for url in urls)
    for item_id in (deleted, idle):
        assert s3_storage.keys(f"uploads/{item_id}/") == [f"uploads/{item_id}/source.tail-{6 * MB}"]
        assert _upload_of(s3_storage, item_id)

    assert client.delete(urls[0], HTTP_TUS_RESUMABLE="1.0.0").status_code == 204
    assert s3_storage.keys(f"uploads/{deleted}/") == []
    still = s3_storage.client.list_multipart_uploads(Bucket=s3_storage.name)["Uploads"]
    assert [upload["Key"] for upload in still] == [f"uploads/{idle}/source"]
    MediaItem.objects.filter(pk=idle).update(updated_at=MediaItem.objects.get(pk=idle).updated_at.replace(year=2000))
    assert uploads.uploads_expire() == 1
    assert s3_storage.keys("uploads/") == []
    assert s3_storage.client.list_multipart_uploads(Bucket=s3_storage.name).get("Uploads", []) == []
