/* ffmpeg.wasm on the upload page: a small pool of Web Workers that probe and cut files in the
 * browser before a byte is sent.
 *
 * Each slot is an @ffmpeg/ffmpeg instance, which runs the single-threaded core in a Web Worker of
 * its own, so the page never waits on ffmpeg. The core (32 MB) is loaded only when the first job
 * needs it, and a slot is reused for the next job. Files are never copied into the worker's memory
 * to be read: they are mounted read-only (WORKERFS), so probing a large video reads its header
 * only. Everything is served from our static files (scripts/fetch_wasm.py installs it).
 *
 * window.cpcWasm = { supported, probe(file) -> info, trim(file, start, end) -> File, stats }
 */
(() => {
  "use strict";

  const config = JSON.parse(document.getElementById("page-config").textContent).wasm || {};
  const supported = Boolean(
    config.ffmpeg && typeof WebAssembly === "object" && typeof Worker === "function",
  );
  const SIZE = Math.max(1, Math.min(config.workers || 2, navigator.hardwareConcurrency || 1));
  const stats = { loads: [], probes: [], trims: [] }; // milliseconds, for the measurements

  let moduleP = null; // the @ffmpeg/ffmpeg module, imported once
  const slots = []; // { ffmpeg, ready: Promise, busy }
  const waiting = []; // jobs waiting for a free slot
  let jobCount = 0;

  function loadModule() {
    if (!moduleP) moduleP = import(new URL(config.ffmpeg, location.href).href);
    return moduleP;
  }

  function newSlot() {
    const slot = { ffmpeg: null, busy: false, ready: null, log: [] };
    slot.ready = loadModule().then(async ({ FFmpeg }) => {
      const started = performance.now();
      slot.ffmpeg = new FFmpeg();
      slot.ffmpeg.on("log", ({ message }) => slot.log.push(message));
      await slot.ffmpeg.load({
        coreURL: new URL(config.core, location.href).href,
        wasmURL: new URL(config.wasm, location.href).href,
      });
      stats.loads.push(Math.round(performance.now() - started));
    });
    slots.push(slot);
    return slot;
  }

  // Runs job(slot) on a free slot (a new one while the pool is not full), one job per slot.
  function run(job) {
    return new Promise((resolve, reject) => {
      waiting.push({ job, resolve, reject });
      dispatch();
    });
  }

  function dispatch() {
    while (waiting.length) {
      let slot = slots.find((s) => !s.busy);
      if (!slot && slots.length < SIZE) slot = newSlot();
      if (!slot) return;
      const { job, resolve, reject } = waiting.shift();
      slot.busy = true;
      slot.ready
        .then(() => job(slot))
        .then(resolve, (err) => {
          // A worker that failed (out of memory, aborted) is replaced, not reused.
          const i = slots.indexOf(slot);
          if (i >= 0) slots.splice(i, 1);
          try { if (slot.ffmpeg) slot.ffmpeg.terminate(); } catch (e) { /* gone */ }
          reject(err);
        })
        .finally(() => {
          slot.busy = false;
          dispatch();
        });
    }
  }

  // The file mounted read-only at /in<n>/<name> for the length of fn.
  async function withFile(slot, file, fn) {
    const dir = `/in${++jobCount}`;
    const { FFFSType } = await loadModule();
    await slot.ffmpeg.createDir(dir);
    await slot.ffmpeg.mount(FFFSType.WORKERFS, { files: [file] }, dir);
    try {
      return await fn(`${dir}/${file.name}`);
    } finally {
      await slot.ffmpeg.unmount(dir);
      await slot.ffmpeg.deleteDir(dir);
    }
  }

  // --- reading ffmpeg's own description of the input --------------------------------------------

  const CODECS = {
    h264: "H.264", hevc: "HEVC", av1: "AV1", vp8: "VP8", vp9: "VP9", mpeg4: "MPEG-4", mpeg2video: "MPEG-2",
    aac: "AAC", mp3: "MP3", opus: "Opus", vorbis: "Vorbis", flac: "FLAC", ac3: "AC-3", alac: "ALAC",
    prores: "ProRes", mjpeg: "Motion JPEG", theora: "Theora", wmv3: "WMV", wmav2: "WMA",
  };

  function codecLabel(name) {
    if (CODECS[name]) return CODECS[name];
    if (name.startsWith("pcm_")) return "PCM";
    return name.toUpperCase();
  }

  // `ffmpeg -i` prints "Input #0, <demuxer>, from …", "Duration: HH:MM:SS.xx" and one line per
  // stream ("Stream #0:0…: Video: h264 (High) …, 1280x720 …"). No "Input #0": not media.
  function parseProbe(lines) {
    const text = lines.join("\n");
    const input = /Input #0, ([^,]+(?:,[^ ,]+)*), from/.exec(text);
    const streams = [];
    for (const m of text.matchAll(/Stream #0:\d+[^:]*: (Video|Audio|Subtitle|Data|Attachment): ([a-z0-9_]+)([^\n]*)/g)) {
      const stream = { type: m[1].toLowerCase(), codec: m[2] };
      if (stream.type === "video") {
        const size = /, (\d{2,5})x(\d{2,5})/.exec(m[3]);
        if (size) { stream.width = Number(size[1]); stream.height = Number(size[2]); }
        if (/\(attached pic\)/.test(m[3])) stream.cover = true;
      }
      streams.push(stream);
    }
    const d = /Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)/.exec(text);
    const duration = d ? Number(d[1]) * 3600 + Number(d[2]) * 60 + Number(d[3]) : null;
    const media = streams.filter((s) => (s.type === "video" && !s.cover) || s.type === "audio");
    const video = media.find((s) => s.type === "video");
    return {
      media: Boolean(input) && media.length > 0,
      demuxer: input ? input[1] : null,
      kind: video ? (duration ? "video" : "image") : media.length ? "audio" : null,
      duration,
      streams: media,
    };
  }

  async function probe(file) {
    return run(async (slot) => {
      const started = performance.now();
      slot.log.length = 0;
      await withFile(slot, file, (path) => slot.ffmpeg.exec(["-hide_banner", "-i", path], 30000));
      const info = parseProbe(slot.log);
      stats.probes.push(Math.round(performance.now() - started));
      return info;
    });
  }

  // Stream copy from the key frame at or before `start` to `end` (seconds): no re-encoding, so
  // the cut starts where a decoder can; the output's container is the input's.
  async function trim(file, start, end) {
    return run(async (slot) => {
      const started = performance.now();
      const ext = (/\.[A-Za-z0-9]{1,5}$/.exec(file.name) || [".mp4"])[0].toLowerCase();
      const out = `/out${++jobCount}${ext}`;
      slot.log.length = 0;
      const code = await withFile(slot, file, (path) => slot.ffmpeg.exec([
        "-hide_banner", "-ss", String(start), "-i", path, "-t", String(end - start),
        "-map", "0:v?", "-map", "0:a?", "-c", "copy", "-avoid_negative_ts", "make_zero", out,
      ]));
      if (code !== 0) {
        throw new Error(`The cut failed in the browser: ${slot.log.slice(-1)[0] || `ffmpeg exit ${code}`}`);
      }
      const data = await slot.ffmpeg.readFile(out);
      await slot.ffmpeg.deleteFile(out);
      const stem = file.name.slice(0, file.name.length - ext.length) || "clip";
      const name = `${stem}-${fmt(start)}s-${fmt(end)}s${ext}`;
      stats.trims.push(Math.round(performance.now() - started));
      return new File([data], name, { type: file.type });
    });
  }

  // "Video · H.264 1280×720 · AAC · 0:20"
  function describe(info) {
    const parts = [{ video: "Video", audio: "Audio", image: "Image" }[info.kind] || "Media"];
    for (const st of info.streams) {
      const codec = codecLabel(st.codec);
      parts.push(st.type === "video" && st.width ? `${codec} ${st.width}×${st.height}` : codec);
    }
    if (info.duration) {
      const t = Math.round(info.duration);
      parts.push(`${Math.floor(t / 60)}:${String(t % 60).padStart(2, "0")}`);
    }
    return parts.join(" · ");
  }

  const fmt = (s) => String(Math.round(s * 10) / 10);

  // --- images: a cheap magic-number check, no wasm --------------------------------------------

  async function imageType(file) {
    const b = new Uint8Array(await file.slice(0, 32).arrayBuffer());
    const ascii = (from, to) => String.fromCharCode(...b.slice(from, to));
    if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "JPEG";
    if (ascii(1, 4) === "PNG" && b[0] === 0x89) return "PNG";
    if (ascii(0, 4) === "GIF8") return "GIF";
    if (ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "WebP";
    if (ascii(4, 8) === "ftyp") {
      const brand = ascii(8, 12);
      if (brand === "avif" || brand === "avis") return "AVIF";
      if (["heic", "heix", "heim", "heis", "mif1", "msf1"].includes(brand)) return "HEIC";
    }
    return null;
  }

  // What the page does with a picked file before sending it: { refused: sentence } or { info }.
  // The verdict is the server's: bytes its sniffer can never accept are refused here with the
  // sentence it gives them (the named formats' or the general "not media" one), before the core
  // is even loaded. ffmpeg.wasm alone would not do: its image2 demuxer takes a text file named
  // .jpg for a JPEG, and it finds no stream in files the server accepts and judges later.
  // Everything else is probed by ffmpeg.wasm, for the card and for cutting.
  async function check(file) {
    const image = await imageType(file);
    if (image) return { info: { media: true, kind: "image", label: `Image · ${image}` } };
    const head = new Uint8Array(await file.slice(0, 4096).arrayBuffer());
    if (!mayBeAccepted(head)) {
      const hex = Array.from(head.slice(0, 64), (b) => b.toString(16).padStart(2, "0")).join("");
      const named = (config.refused_heads || []).find((h) => hex.startsWith(h.hex, h.at * 2));
      return { refused: named ? named.sentence : config.not_media };
    }
    const info = await probe(file);
    // No stream found: this ffmpeg build cannot read it, or it is damaged; the server will say.
    return { info: { ...info, label: info.media ? describe(info) : "" } };
  }

  // A superset of the first bytes pipelines/sniff.py accepts (or answers with another sentence
  // than "not media"): container magic numbers, tags in front of audio, MPEG sync words.
  // tests/e2e/test_wasm.py checks the page against the server on the shared test files.
  function mayBeAccepted(h) {
    const at = (i, text) => text.split("").every((c, k) => h[i + k] === c.charCodeAt(0));
    const u32 = (i) => ((h[i] << 24) | (h[i + 1] << 16) | (h[i + 2] << 8) | h[i + 3]) >>> 0;
    if (["RIFF", "RIFX", "RF64", "BW64", "riff", "OggS", "fLaC", "FORM", "caff", "wvpk", "#!AMR", "FLV", "ID3",
      "APETAGEX"].some((m) => at(0, m))) return true;
    if (["ftyp", "moov", "mdat", "wide", "free", "skip", "pnot", "junk", "uuid"].some((m) => at(4, m))) return true;
    if (u32(0) === 0x1a45dfa3 || u32(0) === 0x060e2b34 || u32(0) === 0x000001ba || u32(0) === 0x000001b3) return true;
    if (h[0] === 0x0b && h[1] === 0x77) return true; // AC-3
    if (h[0] === 0xff && (h[1] & 0xe0) === 0xe0) return true; // MP3 / ADTS AAC frame sync
    for (const stride of [188, 192, 204]) { // MPEG-TS: 0x47 at a packet stride
      for (let start = 0; start < Math.min(stride, h.length); start += 1) {
        if (h[start] !== 0x47) continue;
        let hits = 0;
        let count = 0;
        for (let p = start; p < h.length; p += stride) { count += 1; if (h[p] === 0x47) hits += 1; }
        if (hits >= 3 && hits >= count - Math.floor(count / 10)) return true;
      }
    }
    return false;
  }

  window.cpcWasm = {
    supported, check, probe, trim, imageType, parseProbe, describe, stats, size: SIZE, notMedia: config.not_media,
  };
})();
