"""ffmpeg.wasm on the upload page, in headless Chromium against the live server and the real worker.

The page probes every picked file in a Web Worker before a byte is sent: not media is refused on
the spot with the server's own sentence and nothing reaches /api/tus/; a video's streams and
duration fill its card; with "Edit before upload" the cut is made in the browser by stream copy
and only the cut part is uploaded and processed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from media_app.views import WASM_CORE, WASM_FFMPEG, not_media_sentence
from pipelines.errors import InvalidInput, UnsupportedCodec
from pipelines.runner import ffmpeg_exe
from pipelines.sniff import HEAD_BYTES, sniff_bytes
from tests.conftest import TESTDATA
from tests.e2e.test_graphiql import confine_to
from tests.env_plugin import ROOT

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
pytestmark = pytest.mark.worker

STATIC = ROOT / "media_app" / "static"
TIMES = "\N{MULTIPLICATION SIGN}"  # as the page writes a frame size


@pytest.fixture(autouse=True)
def wasm_installed() -> None:
    for path in (WASM_FFMPEG, f"{WASM_CORE}.js", f"{WASM_CORE}.wasm"):
        assert (STATIC / path).is_file(), f"{path} is missing: run `python3 scripts/fetch_wasm.py` (make test does)"


def card(page: Any, name: str) -> Any:
    return page.locator(f'#uploads .card:has([data-name]:text-is("{name}"))')


def clip(path: Path, seconds: int = 20) -> Path:
    """H.264 640x360 25 fps with a key frame every second, and AAC."""
    subprocess.run(
        [
            *(ffmpeg_exe(), "-v", "error", "-y"),
            *("-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={seconds}"),
            *("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0"),
            *("-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)),
        ],
        check=True,
    )
    return path


def test_a_text_file_named_mp4_is_refused_in_the_browser_and_nothing_is_created(
    logged_in_page, asgi_server, shots, tmp_path, traffic
):
    page = logged_in_page
    elsewhere = confine_to(page, asgi_server.url)
    fake = tmp_path / "holiday.mp4"
    fake.write_text("Dear diary, today I renamed a text file to .mp4.\n" * 40)
    page.set_input_files("#file-input", str(fake))

    refused = card(page, fake.name)
    expect(refused.locator("[data-badge]")).to_have_text("Not sent", timeout=30_000)
    # The server's own sentence, word for word (the page gets it from the sniffer, not a copy).
    expect(refused.locator("[data-error]")).to_have_text(not_media_sentence())
    shots.take(page, "text-named-mp4-refused")

    assert "/api/tus/" not in traffic.paths("POST")
    assert page.request.get("/api/media/").json()["results"] == []
    # Its first bytes were enough: the 32 MB core is loaded only for a file that needs a probe.
    assert not any(p.endswith("ffmpeg-core.wasm") for p in traffic.paths())
    assert elsewhere == [] and traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []


def test_probe_fills_the_card_then_a_cut_in_the_browser_is_uploaded_and_processed(
    logged_in_page, asgi_server, shots, tmp_path, traffic
):
    page = logged_in_page
    elsewhere = confine_to(page, asgi_server.url)
    source = clip(tmp_path / "walk.mp4")
    page.get_by_label("Edit before upload").check()
    page.set_input_files("#file-input", str(source))

    waiting = card(page, source.name)
    # The probe's streams and duration, before any byte is sent (the video waits for its cut).
    expect(waiting.locator("[data-meta]")).to_contain_text(f"Video · H.264 640{TIMES}360 · AAC · 0:20", timeout=30_000)
    expect(waiting.locator("[data-badge]")).to_have_text("Waiting for you")
    assert "/api/tus/" not in traffic.paths("POST")
    shots.take(page, "probed-waiting-for-the-cut")

    # The page stays responsive while the worker cuts: a timer on the main thread keeps ticking.
    page.evaluate("window.__ticks = []; window.__tick = setInterval(() => __ticks.push(performance.now()), 50)")
    waiting.get_by_label("Start (s)").fill("2")
    waiting.get_by_label("End (s)").fill("7")
    waiting.get_by_role("button", name=f"Upload the cut of {source.name}").click()

    cut_name = "walk-2s-7s.mp4"
    done = card(page, cut_name)
    expect(done.locator("[data-meta]")).to_contain_text(f"Video · H.264 640{TIMES}360 · AAC · 0:05", timeout=30_000)
    gap = page.evaluate("clearInterval(__tick), Math.max(...__ticks.slice(1).map((t, i) => t - __ticks[i]))")
    assert gap < 500, f"the page froze for {gap:.0f} ms during the cut"
    shots.take(page, "cut-and-uploading")
    expect(done.locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    shots.take(page, "cut-completed")

    items = page.request.get("/api/media/").json()["results"]
    assert [i["file_name"] for i in items] == [cut_name]
    detail = page.request.get(f"/api/media/{items[0]['id']}").json()
    video = next(o for o in detail["outputs"] if o["role"] == "video")
    assert abs(video["duration"] - 5) <= 1, video
    # Only the cut was sent: one create, whose length is the cut file's, well under the source's.
    creates = [r for r in traffic.requests if r.method == "POST" and r.url.endswith("/api/tus/")]
    assert len(creates) == 1
    assert int(creates[0].headers["upload-length"]) < source.stat().st_size * 0.4
    stats = page.evaluate("window.cpcWasm.stats")
    print(f"\nffmpeg.wasm (ms): core loads {stats['loads']}, probes {stats['probes']}, trims {stats['trims']}")
    assert elsewhere == [] and traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []


def server_verdict(path: Path) -> str | None:
    """What the server's sniffer says of the file's first bytes: None (accepted) or its sentence."""
    try:
        sniff_bytes(path.read_bytes()[:HEAD_BYTES])
    except (InvalidInput, UnsupportedCodec) as exc:
        return exc.message
    return None


def test_the_browser_refuses_only_what_the_server_refuses_and_in_its_words(logged_in_page, traffic):
    """Every real file and every hostile one of the shared test data, checked in the page as a
    picked file is: a real file is never refused, and a file the page refuses is one the server
    refuses too, with the same sentence."""
    page = logged_in_page
    files = sorted(p for folder in ("real", "hostile") for p in (TESTDATA / folder).iterdir() if p.stat().st_size)
    page.evaluate(
        "document.body.append(Object.assign(document.createElement('input'), {type: 'file', id: 'x', multiple: true}))"
    )
    page.set_input_files("#x", [str(p) for p in files])
    verdicts = page.evaluate(
        "async () => { const out = []; for (const f of document.getElementById('x').files) {"
        " const c = await window.cpcWasm.check(f); out.push(c.refused || null); } return out; }"
    )
    refused_here = {p.parent.name + "/" + p.name: v for p, v in zip(files, verdicts, strict=True) if v}
    assert not [name for name in refused_here if name.startswith("real/")], refused_here
    wrong = {name: (said, server_verdict(TESTDATA / name)) for name, said in refused_here.items()}
    wrong = {name: pair for name, pair in wrong.items() if pair[0] != pair[1]}
    assert wrong == {}, f"refused in the page with other words than the server's (page, server): {wrong}"
    # Every file the server refuses from its first bytes never leaves the browser, and neither do
    # the text files dressed as media (SVG, PHP, MVG, playlists) among them.
    refused_by_server = {p.parent.name + "/" + p.name for p in files if server_verdict(p)}
    assert set(refused_here) == refused_by_server
    assert {"hostile/php_shell.jpg.php", "hostile/imagemagick_local_file.svg"} <= set(refused_here)
    assert "/api/tus/" not in traffic.paths("POST")
