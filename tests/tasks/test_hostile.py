"""Every hostile sample ends in a final state with a readable reason, through the CLI and the real
worker; nothing leaks a local file, the worker survives, and a normal file beside them completes."""

from __future__ import annotations

from pathlib import Path

import pytest

from media_app.models import MediaItem
from media_app.services import media_processing_start
from tasks.bindings import profiles
from tests.conftest import TESTDATA, run_process_command, wait_for
from tests.media import drawn_image

HOSTILE = sorted((TESTDATA / "hostile").iterdir())
# A merely truncated ordinary file may be processed as far as it decodes (testdata README).
MAY_COMPLETE = {p.name for p in HOSTILE if "truncated" in p.name or p.name == "heif_corrupted.heic"}
CODES = {"invalid_input", "unsupported_codec", "too_large", "timeout"}
PASSWD_LINES = [line.encode() for line in Path("/etc/passwd").read_text().splitlines() if len(line) > 12]


def _no_local_file_leaked(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        for line in PASSWD_LINES:
            assert line not in data, f"{path} contains a line of /etc/passwd"


def _readable(message: str) -> bool:
    return bool(message) and "Traceback" not in message and len(message) < 300 and message[0].isupper()


def _check(name: str, status: str, code: str | None, message: str | None) -> None:
    if status == "Completed":
        assert name in MAY_COMPLETE, f"{name} must not complete"
        return
    assert status == "Failed", f"{name}: {status}"
    assert code in CODES, f"{name}: {code} {message}"
    assert _readable(message or ""), f"{name}: unreadable reason {message!r}"
    bomb = name.startswith(("pillow_decompression_bomb", "pillow_png_decompression", "heif_200megapixel"))
    if bomb and name.endswith((".gif", ".png", ".heic")):  # allow-listed formats: caught by the pixel limit
        assert code == "too_large", f"{name}: {code}"


def test_every_hostile_sample_through_the_cli(tmp_path):
    proc, reports = run_process_command(HOSTILE, tmp_path / "data", timeout=600)
    assert set(reports) == {p.name for p in HOSTILE}, proc.stderr[-3000:]
    assert proc.returncode == 1  # some failed, as they must
    for name, report in reports.items():
        error = report["error"] or {}
        _check(name, report["status"], error.get("code"), error.get("message"))
    _no_local_file_leaked([p for p in (tmp_path / "data" / "media" / "outputs").rglob("*") if p.is_file()])


@pytest.mark.worker
def test_every_hostile_sample_on_the_real_worker_with_a_normal_file_beside(celery_worker, make_item, tmp_path):
    from django.core.files.storage import default_storage

    items = {p.name: make_item(p) for p in HOSTILE}
    normal = make_item(drawn_image(tmp_path / "normal.jpg"))
    for item in [*items.values(), normal]:
        media_processing_start(item=item)

    def all_final() -> bool:
        return (
            not MediaItem.objects.filter(pk__in=[i.pk for i in [*items.values(), normal]])
            .exclude(status__in=("Completed", "Failed"))
            .exists()
        )

    wait_for(all_final, timeout=300, what="every hostile item to reach a final state")

    normal.refresh_from_db()
    assert normal.status == "Completed"
    outputs = []
    memory_limit = profiles().limits.memory_bytes
    for name, item in items.items():
        item.refresh_from_db()
        _check(name, item.status, item.error_code or None, item.error_message)
        assert item.peak_child_rss <= memory_limit, f"{name}: a child used {item.peak_child_rss} bytes"
        outputs += [Path(default_storage.path(r.storage_key)) for r in item.renditions.all()]
    _no_local_file_leaked(outputs)
    assert celery_worker.is_running()
