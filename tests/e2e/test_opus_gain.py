"""Chromium applies the Opus header's output gain (RFC 7845), which is how the pipeline sets an
output's loudness (``pipelines.opus_gain``): the same tone with 0 dB and with +6 dB patched into
its header plays 6 dB louder, decoded by Web Audio, played by an ``<audio>`` element and played
through Media Source (how the DASH player plays a video's audio)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipelines import opus_gain
from pipelines.runner import ffmpeg_exe

pytestmark = pytest.mark.worker

TONES = "/__opus-gain__/"
# The page is ours alone (Playwright answers its requests), on the server's origin.
PAGE = "<!doctype html><title>gain</title><button id=go>play</button>"

# RMS of each file: decoded whole by decodeAudioData, and as played (after a gesture) by an
# <audio> element and by Media Source, each read from an AnalyserNode while the tone sounds.
MEASURE = """async (names) => {
  const rms = (data, from = 0, to = data.length) => {
    let sum = 0;
    for (let i = from; i < to; i++) sum += data[i] * data[i];
    return Math.sqrt(sum / Math.max(1, to - from));
  };
  const fetched = {};
  for (const name of names) fetched[name] = await (await fetch(name)).arrayBuffer();
  const out = {};
  for (const name of names) {
    const decoded = await new OfflineAudioContext(1, 48000, 48000).decodeAudioData(fetched[name].slice(0));
    const samples = decoded.getChannelData(0);
    out[name] = { decoded: rms(samples, Math.floor(samples.length / 4), Math.floor((3 * samples.length) / 4)) };
  }
  const listen = async (media) => {
    const ctx = new AudioContext();
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 2048;
    ctx.createMediaElementSource(media).connect(analyser);
    analyser.connect(ctx.destination);
    await ctx.resume();
    await media.play();
    const levels = [];
    const buf = new Float32Array(analyser.fftSize);
    const until = performance.now() + 5000;
    while (levels.length < 8 && performance.now() < until) {
      await new Promise((r) => setTimeout(r, 60));
      if (media.currentTime < 0.3) continue;  // past the start, where the tone ramps in
      analyser.getFloatTimeDomainData(buf);
      levels.push(rms(buf));
    }
    media.pause();
    await ctx.close();
    levels.sort((a, b) => a - b);
    return levels.length ? levels[Math.floor(levels.length / 2)] : null;
  };
  for (const name of names) {
    const element = new Audio();
    element.src = URL.createObjectURL(new Blob([fetched[name]], { type: "audio/webm" }));
    out[name].element = await listen(element);

    const source = new MediaSource();
    const viaMse = new Audio();
    viaMse.src = URL.createObjectURL(source);
    await new Promise((r) => source.addEventListener("sourceopen", r, { once: true }));
    const buffer = source.addSourceBuffer('audio/webm; codecs="opus"');
    buffer.appendBuffer(fetched[name]);
    await new Promise((r) => buffer.addEventListener("updateend", r, { once: true }));
    source.endOfStream();
    out[name].mse = await listen(viaMse);
  }
  return out;
}"""


def _tone(path: Path) -> Path:
    """5 s of a 440 Hz sine of peak 0.125 (lavfi's) less 20 dB, Opus in WebM, gain 0."""
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=5",
         "-af", "volume=-20dB", "-c:a", "libopus", "-b:a", "96k", "-f", "webm", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def test_chromium_plays_the_opus_header_gain(page: Any, asgi_server: Any, tmp_path: Path) -> None:
    plain = _tone(tmp_path / "plain.webm")
    louder = tmp_path / "louder.webm"
    louder.write_bytes(plain.read_bytes())
    opus_gain.write_gain(louder, 6.0)
    files = {"plain.webm": plain.read_bytes(), "louder.webm": louder.read_bytes()}

    def answer(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[-1]
        if name in files:
            route.fulfill(status=200, body=files[name], headers={"Content-Type": "audio/webm"})
        else:
            route.fulfill(status=200, body=PAGE, headers={"Content-Type": "text/html"})

    page.route(f"{asgi_server.url}{TONES}**", answer)
    page.goto(f"{asgi_server.url}{TONES}index.html")
    # Playback may start only after a gesture: the measurement runs from a click.
    page.evaluate("m => { window.__run = () => (" + MEASURE + ")(m); }", [f"{TONES}plain.webm", f"{TONES}louder.webm"])
    page.evaluate("() => document.getElementById('go').onclick = () => { window.__result = window.__run(); }")
    page.click("#go")
    levels = page.evaluate("() => window.__result")

    plain_levels, louder_levels = levels[f"{TONES}plain.webm"], levels[f"{TONES}louder.webm"]
    # A sine of peak 0.0125 has an RMS of 0.0088: silence or a failed decode cannot pass.
    assert plain_levels["decoded"] == pytest.approx(0.0088, rel=0.1)
    for way in ("decoded", "element", "mse"):
        assert plain_levels[way] and louder_levels[way], (way, levels)
        difference = 20 * math.log10(louder_levels[way] / plain_levels[way])
        assert difference == pytest.approx(6.0, abs=0.5), (way, levels)
