/*
 * cpc-media upload page.
 *
 * Files go up with tus (tus-js-client, 8 MB chunks); tus-js-client remembers each upload's URL
 * in localStorage under the file's fingerprint, so after a reload the same file picks up at the
 * offset the server holds. Status comes from one websocket (/ws/media/: every item of the user,
 * a snapshot first, then each change with a sequence number). Results play from signed URLs:
 * video through dash.js from the DASH manifest, falling back to the progressive WebM.
 *
 * Plain script, no build step: the two libraries are vendored under vendor/<name>-<version>/.
 */
(() => {
  "use strict";

  const config = JSON.parse(document.getElementById("page-config").textContent);
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const limits = config.limits;

  const STAGES = {
    upload: "Receiving",
    demux: "Reading the file",
    decode: "Decoding",
    normalize: "Analysing",
    filter: "Preparing",
    encode: "Encoding",
    mux: "Packaging",
    chunk: "Cutting stream segments",
    previews: "Making the thumbnail",
    store: "Saving the results",
  };
  const ROLES = {
    video: "WebM video",
    audio: "WebM audio",
    image_avif: "AVIF image",
    image_webp: "WebP image",
    thumbnail: "Thumbnail",
    manifest: "DASH manifest",
  };
  const MAIN_ROLES = ["video", "audio", "image_avif", "image_webp"];
  const TONES = { Pending: "wait", Processing: "busy", Completed: "ok", Failed: "bad" };

  // --- small helpers ---------------------------------------------------------------------------

  function formatBytes(n) {
    if (n == null || Number.isNaN(n)) return "–";
    if (n < 1024) return `${n} B`;
    let value = n;
    let unit = "B";
    for (const u of ["KB", "MB", "GB", "TB"]) {
      value /= 1024;
      unit = u;
      if (value < 1024) break;
    }
    return `${value.toFixed(value < 100 ? 1 : 0)} ${unit}`;
  }

  function formatDuration(seconds) {
    if (seconds == null || !Number.isFinite(seconds)) return "";
    const s = Math.max(1, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return s % 60 ? `${m} min ${s % 60} s` : `${m} min`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value == null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of [].concat(children)) if (child != null) node.append(child);
    return node;
  }

  function extensionOf(name) {
    const dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(dot).toLowerCase() : "";
  }

  function itemIdFromUrl(url) {
    return url ? decodeURIComponent(new URL(url, location.href).pathname.split("/").filter(Boolean).pop()) : null;
  }

  const announcer = document.getElementById("announcer");
  function announce(text) {
    // Cleared first so the same words twice are read twice.
    announcer.textContent = "";
    window.setTimeout(() => { announcer.textContent = text; }, 50);
  }

  async function api(method, url) {
    let res;
    try {
      res = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRFToken": csrfToken },
      });
    } catch (err) {
      return { ok: false, status: 0, body: null, message: "The server could not be reached. Check the connection." };
    }
    let body = null;
    try { body = await res.json(); } catch (err) { body = null; }
    const message = (body && body.error && body.error.message) || `The server answered ${res.status}.`;
    return { ok: res.ok, status: res.status, body, message };
  }

  function tusErrorMessage(err) {
    const res = err && err.originalResponse;
    if (res) {
      try {
        const body = JSON.parse(res.getBody());
        if (body && body.error && body.error.message) return body.error.message;
      } catch (e) { /* not JSON */ }
      if (res.getStatus() === 403) return "You are signed out or the page is out of date; reload it.";
      return `The server refused the upload (${res.getStatus()}).`;
    }
    return "The connection was lost. Add the same file again to continue where it stopped.";
  }

  function describeAccepted() {
    const groups = { video: [], audio: [], image: [] };
    for (const ext of limits.allowed_extensions) {
      const kind = ext.match(/mp4|m4v|mov|qt|avi|mkv|webm/) ? "video"
        : ext.match(/mp3|wav|flac|ogg|oga|opus|m4a|aac/) ? "audio" : "image";
      groups[kind].push(ext.slice(1).toUpperCase());
    }
    return Object.entries(groups)
      .filter(([, exts]) => exts.length)
      .map(([kind, exts]) => `${kind} (${exts.join(", ")})`)
      .join("; ");
  }

  function clientRefusal(file) {
    if (file.size === 0) return "This file is empty.";
    if (file.size > limits.max_bytes) {
      return `This file is ${formatBytes(file.size)}; the largest file accepted is ${formatBytes(limits.max_bytes)}.`;
    }
    const type = (file.type || "").toLowerCase();
    const ext = extensionOf(file.name);
    if (!limits.allowed_types.includes(type) && !limits.allowed_extensions.includes(ext)) {
      const what = type || (ext ? `${ext.slice(1).toUpperCase()} files` : "Files without an extension");
      return `${what} ${type ? "files are" : "are"} not accepted. Accepted: ${describeAccepted()}.`;
    }
    return null;
  }

  // --- cards -----------------------------------------------------------------------------------

  const template = document.getElementById("card-template");
  const uploadsList = document.getElementById("uploads");
  const libraryList = document.getElementById("library");
  const libraryEmpty = document.getElementById("library-empty");
  const libraryMore = document.getElementById("library-more");
  const known = new Map(); // item id -> latest state (highest seq)
  const cardsById = new Map(); // item id -> Card (on the page, in either list)
  let cardCount = 0;

  class Card {
    constructor({ name, size, session }) {
      this.n = ++cardCount;
      this.name = name;
      this.size = size;
      this.session = session;
      this.itemId = null;
      this.item = null;
      this.upload = null;
      this.uploading = false;
      this.resultsShown = false;
      this.node = template.content.firstElementChild.cloneNode(true);
      this.node.dataset.card = String(this.n);
      this.q = (sel) => this.node.querySelector(sel);
      this.q("[data-name]").textContent = name;
      this.badge = this.q("[data-badge]");
      for (const role of ["upload", "process"]) {
        const box = this.q(`[data-box="${role}"]`);
        const bar = box.querySelector("progress");
        bar.id = `${role}-bar-${this.n}`;
        box.querySelector("label").htmlFor = bar.id;
        const text = box.querySelector("[data-text]");
        text.id = `${role}-text-${this.n}`;
        bar.setAttribute("aria-describedby", text.id);
      }
      this.retryButton = this.q('[data-action="retry"]');
      this.cancelButton = this.q('[data-action="cancel"]');
      this.retryButton.setAttribute("aria-label", `Retry ${name}`);
      this.retryButton.addEventListener("click", () => this.retry());
      this.cancelButton.addEventListener("click", () => this.cancel());
      if (!session) {
        // Earlier items: results link and buttons share one line.
        const foot = el("div", { class: "card-foot" });
        this.q("[data-results]").before(foot);
        foot.append(this.q("[data-results]"), this.q(".actions"));
      }
      this.setMeta();
      this.setCancelLabel("Cancel");
    }

    setMeta() {
      const parts = [formatBytes(this.size)];
      if (this.item && this.item.kind) parts.push(this.item.kind);
      if (this.item && this.item.created_at && !this.session) {
        parts.push(new Date(this.item.created_at).toLocaleString());
      }
      this.q("[data-meta]").textContent = parts.join(" · ");
    }

    setBadge(text, tone) {
      this.badge.textContent = text;
      this.badge.dataset.tone = tone || "";
    }

    setState(state) { this.node.dataset.state = state; }

    setCancelLabel(label) {
      this.cancelButton.textContent = label;
      this.cancelButton.setAttribute("aria-label", `${label} ${this.name}`);
    }

    bar(role, value, text) {
      const box = this.q(`[data-box="${role}"]`);
      box.hidden = false;
      if (value != null) box.querySelector("progress").value = value;
      box.querySelector("[data-text]").textContent = text;
    }

    hideBar(role) { this.q(`[data-box="${role}"]`).hidden = true; }

    note(text, tone) {
      const node = this.q("[data-note]");
      node.hidden = !text;
      node.textContent = text || "";
      node.dataset.tone = tone || "";
    }

    error(text) {
      const node = this.q("[data-error]");
      node.hidden = !text;
      node.textContent = text || "";
    }

    claim(itemId) {
      // This card now stands for a server item: a row for the same item elsewhere gives way.
      if (!itemId || this.itemId === itemId) return;
      this.itemId = itemId;
      this.node.dataset.itemId = itemId;
      const other = cardsById.get(itemId);
      if (other && other !== this) other.node.remove();
      cardsById.set(itemId, this);
      library.updateEmpty();
      const state = known.get(itemId);
      if (state) this.setItem(state);
    }

    // Upload side ------------------------------------------------------------------------------

    startUpload(file) {
      this.uploading = true;
      this.setState("uploading");
      this.setBadge("Uploading", "busy");
      this.bar("upload", 0, "Starting…");
      const samples = [];
      const upload = new tus.Upload(file, {
        endpoint: config.urls.tus,
        chunkSize: config.chunk_bytes,
        retryDelays: [0, 1000, 3000, 5000, 10000],
        metadata: { filename: file.name, filetype: file.type },
        headers: { "X-CSRFToken": csrfToken },
        removeFingerprintOnSuccess: true,
        onUploadUrlAvailable: () => this.claim(itemIdFromUrl(upload.url)),
        onAfterResponse: (req, res) => {
          if (req.getMethod() !== "HEAD" || res.getStatus() >= 300) return;
          const offset = Number.parseInt(res.getHeader("Upload-Offset"), 10);
          if (offset > 0) {
            this.resumedAt = offset;
            this.node.dataset.resumedOffset = String(offset);
            this.note(`Resumed at ${formatBytes(offset)} of ${formatBytes(file.size)}: `
              + `${Math.floor((offset / file.size) * 100)}% was already on the server.`, "ok");
            announce(`${this.name}: resuming at ${Math.floor((offset / file.size) * 100)}%`);
          }
        },
        onProgress: (sent, total) => {
          const now = performance.now();
          samples.push([now, sent]);
          while (samples.length > 2 && now - samples[0][0] > 4000) samples.shift();
          const [t0, b0] = samples[0];
          const speed = now > t0 ? ((sent - b0) * 1000) / (now - t0) : 0;
          const pct = total ? Math.floor((sent / total) * 100) : 0;
          const parts = [`${pct}%`, `${formatBytes(sent)} of ${formatBytes(total)}`];
          if (speed > 0 && sent < total) {
            parts.push(`${formatBytes(speed)}/s`, `${formatDuration((total - sent) / speed)} left`);
          }
          this.bar("upload", pct, parts.join(" · "));
        },
        onSuccess: () => this.uploaded(),
        onError: (err) => this.uploadFailed(tusErrorMessage(err)),
      });
      this.upload = upload;
      upload.findPreviousUploads().then((previous) => {
        if (previous.length) {
          previous.sort((a, b) => new Date(b.creationTime) - new Date(a.creationTime));
          upload.resumeFromPreviousUpload(previous[0]);
          unfinished.forget(previous[0].urlStorageKey);
          this.note("Looking up the part already uploaded…");
        }
        upload.start();
      });
    }

    uploaded() {
      this.uploading = false;
      this.bar("upload", 100, `Uploaded ${formatBytes(this.size)}`);
      announce(`${this.name}: uploaded, waiting for processing`);
      if (!this.item || this.item.status === "Pending") {
        this.setState("pending");
        this.setBadge("Pending", "wait");
        this.bar("process", 0, "Waiting to start…");
      }
      if (this.itemId) {
        api("GET", `${config.urls.media}${this.itemId}`).then((r) => { if (r.ok) applyItem(r.body); });
      }
    }

    uploadFailed(message) {
      this.uploading = false;
      this.setState("failed");
      this.setBadge("Failed", "bad");
      this.error(message);
      this.setCancelLabel(this.itemId ? "Delete" : "Remove");
      this.retryButton.hidden = !this.itemId;
      announce(`${this.name}: upload failed. ${message}`);
    }

    refuse(message) {
      this.setState("refused");
      this.setBadge("Not sent", "bad");
      this.error(message);
      this.setCancelLabel("Remove");
    }

    // Server side ------------------------------------------------------------------------------

    setItem(item) {
      const before = this.item ? this.item.status : null;
      this.item = item;
      if (item.size) this.size = item.size;
      this.setMeta();
      if (this.uploading) return; // the upload bar speaks until the last byte is in
      const status = item.status;
      this.setState(status.toLowerCase());
      this.setBadge(status, TONES[status]);
      this.retryButton.hidden = status !== "Failed";
      this.setCancelLabel(status === "Completed" || status === "Failed" ? "Delete" : "Cancel");
      if (status === "Failed") {
        this.error(item.error ? item.error.message : "Processing failed.");
        this.hideBar("process");
      } else {
        this.error("");
      }
      if (status === "Pending") {
        const wait = item.queue_position ? `Waiting in queue · position ${item.queue_position}` : "Waiting to start…";
        if (item.queue_position || this.session) this.bar("process", 0, wait);
        else this.note("Waiting for its upload to finish or for its turn.");
      } else if (status === "Processing") {
        const parts = [STAGES[item.stage] || item.stage || "Starting", `${item.progress}%`];
        if (item.eta_seconds != null) parts.push(`about ${formatDuration(item.eta_seconds)} left`);
        if (item.attempts > 1) parts.push(`attempt ${item.attempts}`);
        this.bar("process", item.progress, parts.join(" · "));
        if (!this.resumedAt) this.note("");
      } else if (status === "Completed") {
        const took = item.started_at && item.finished_at
          ? ` in ${formatDuration((new Date(item.finished_at) - new Date(item.started_at)) / 1000)}` : "";
        this.bar("process", 100, `Done${took}`);
        if (!this.session) this.hideBar("process");
        this.showResults();
      }
      if (before !== status && before !== null) {
        const reason = status === "Failed" && item.error ? ` ${item.error.message}` : "";
        announce(`${this.name}: ${status}.${reason}`);
      }
    }

    showResults() {
      if (this.resultsShown || !this.itemId) return;
      this.resultsShown = true;
      const box = this.q("[data-results]");
      box.hidden = false;
      box.replaceChildren();
      const load = async (into) => {
        const r = await api("GET", `${config.urls.media}${this.itemId}`);
        if (!r.ok) {
          into.append(el("p", { class: "error", text: r.message }));
          return;
        }
        renderResults(into, r.body, this);
      };
      if (this.session) {
        load(box);
        return;
      }
      // Earlier items open on demand: no player is made, and no URL signed, for a closed row.
      const details = el("details", { class: "more" }, [el("summary", { text: "Show results" })]);
      const inner = el("div", { class: "results" });
      details.append(inner);
      details.addEventListener("toggle", () => {
        if (details.open && !inner.childElementCount) load(inner);
      });
      box.append(details);
    }

    clearResults() {
      this.resultsShown = false;
      const box = this.q("[data-results]");
      for (const video of box.querySelectorAll("video")) if (video._player) video._player.reset();
      box.replaceChildren();
      box.hidden = true;
    }

    // Actions ----------------------------------------------------------------------------------

    async retry() {
      if (!this.itemId) return;
      this.retryButton.disabled = true;
      const r = await api("POST", `${config.urls.media}${this.itemId}/retry`);
      this.retryButton.disabled = false;
      if (!r.ok) {
        this.error(r.message);
        announce(`${this.name}: ${r.message}`);
        return;
      }
      this.clearResults();
      announce(`${this.name}: retrying`);
      applyItem(r.body);
    }

    async cancel() {
      this.cancelButton.disabled = true;
      if (this.upload && this.uploading) {
        // Terminates the tus upload (DELETE), which removes the item and its bytes.
        try { await this.upload.abort(true); } catch (err) { /* gone already */ }
        this.uploading = false;
      } else if (this.itemId) {
        const r = await api("DELETE", `${config.urls.media}${this.itemId}`);
        if (!r.ok && r.status !== 404) {
          this.cancelButton.disabled = false;
          this.error(r.message);
          return;
        }
      }
      this.clearResults();
      this.node.remove();
      if (this.itemId) {
        cardsById.delete(this.itemId);
        known.delete(this.itemId);
      }
      announce(`${this.name}: ${this.cancelButton.textContent === "Delete" ? "deleted" : "cancelled"}`);
      library.updateEmpty();
    }
  }

  // --- results ---------------------------------------------------------------------------------

  function renderResults(box, detail, card) {
    const outputs = {};
    for (const out of detail.outputs || []) outputs[out.role] = out;
    const name = detail.file_name;
    const thumb = outputs.thumbnail || outputs.image_webp;
    if (thumb) {
      const img = card.q(".card-thumb");
      img.src = thumb.url;
      img.hidden = false;
    }
    if (detail.kind === "video" && (outputs.manifest || outputs.video)) {
      box.append(videoPlayer(outputs, name));
    } else if (detail.kind === "audio" && outputs.audio) {
      box.append(el("figure", { class: "player" }, [
        el("audio", { controls: true, preload: "metadata", src: outputs.audio.url, "aria-label": `Processed audio: ${name}` }),
        el("figcaption", { text: "WebM audio (Opus)" }),
      ]));
    } else if (detail.kind === "image" && (outputs.image_avif || outputs.image_webp)) {
      const fallback = outputs.image_webp || outputs.image_avif;
      const picture = el("picture", {}, [
        outputs.image_avif ? el("source", { type: "image/avif", srcset: outputs.image_avif.url }) : null,
        outputs.image_webp ? el("source", { type: "image/webp", srcset: outputs.image_webp.url }) : null,
        el("img", {
          src: fallback.url, alt: `Processed image: ${name}`, width: fallback.width, height: fallback.height,
          decoding: "async",
        }),
      ]);
      box.append(el("figure", { class: "player" }, [picture, el("figcaption", {
        text: `${outputs.image_avif ? "AVIF" : ""}${outputs.image_avif && outputs.image_webp ? " with WebP fallback" : ""}`
          + `${!outputs.image_avif ? "WebP" : ""} · ${fallback.width}×${fallback.height}`,
      })]));
    }
    box.append(sizeList(detail, outputs));
  }

  function videoPlayer(outputs, name) {
    const video = el("video", {
      controls: true, playsinline: true, preload: "metadata", poster: outputs.thumbnail && outputs.thumbnail.url,
      "aria-label": `Processed video: ${name}`,
    });
    const caption = el("figcaption");
    const dims = outputs.video && outputs.video.width ? ` · ${outputs.video.width}×${outputs.video.height}` : "";
    const codecs = outputs.video ? codecName(outputs.video.codec) : "AV1 + Opus";
    const progressive = (why) => {
      if (video.dataset.source === "webm" || !outputs.video) return;
      if (video._player) { video._player.reset(); video._player = null; }
      video.src = outputs.video.url;
      video.dataset.source = "webm";
      caption.textContent = `Progressive WebM (${codecs})${dims}${why ? ` — ${why}` : ""}`;
    };
    const dash = window.dashjs;
    const mse = "MediaSource" in window || "ManagedMediaSource" in window;
    if (outputs.manifest && dash && mse) {
      const player = dash.MediaPlayer().create();
      player.updateSettings({
        debug: { logLevel: dash.Debug ? dash.Debug.LOG_LEVEL_WARNING : 3 },
        // A static manifest needs no clock; never ask a time server (closed networks).
        streaming: { utcSynchronization: { enabled: false } },
      });
      player.on(dash.MediaPlayer.events.ERROR, () => progressive("the stream could not be played"));
      player.initialize(video, outputs.manifest.url, false);
      video._player = player;
      video.dataset.source = "dash";
      caption.textContent = `DASH stream (dash.js) · ${codecs}${dims}`;
    } else {
      progressive(outputs.manifest ? "this browser has no Media Source Extensions" : "");
    }
    return el("figure", { class: "player" }, [video, caption]);
  }

  function codecName(codec) {
    const names = { av1: "AV1", opus: "Opus", vp9: "VP9", h264: "H.264", aac: "AAC" };
    return (codec || "").split("+").map((c) => names[c] || c).join(" + ");
  }

  function sizeList(detail, outputs) {
    const dl = el("dl", { class: "sizes", "aria-label": `Sizes of ${detail.file_name}` });
    dl.append(el("dt", { text: "Original upload" }), el("dd", { text: formatBytes(detail.size) }));
    for (const role of [...MAIN_ROLES, "thumbnail"]) {
      const out = outputs[role];
      if (!out) continue;
      const label = [ROLES[role] || role];
      if (role === "video" || role === "audio") label.push(codecName(out.codec));
      if (out.width) label.push(`${out.width}×${out.height}`);
      const dd = el("dd", { text: formatBytes(out.bytes) });
      if (MAIN_ROLES.includes(role) && detail.size) {
        const change = (1 - out.bytes / detail.size) * 100;
        // One decimal near the ends, so a 99.8% saving does not read as "all of it".
        const shown = Math.abs(change) >= 99.5 && Math.abs(change) < 100 ? Math.abs(change).toFixed(1)
          : String(Math.round(Math.abs(change)));
        dd.append(" ", el("span", {
          class: change >= 0 ? "saving" : "growth",
          text: change >= 0 ? `(−${shown}%)` : `(+${shown}%)`,
        }));
      }
      dd.append(" ", el("a", {
        href: out.url, download: true, text: "Download", "aria-label": `Download ${ROLES[role] || role} of ${detail.file_name}`,
      }));
      dl.append(el("dt", { text: label.join(" · ") }), dd);
    }
    return dl;
  }

  // --- the list of earlier items ---------------------------------------------------------------

  const library = {
    loaded: false,
    next: null,
    oldest: null,

    fits(item) {
      // Only items inside the range the API has listed: older ones arrive with "Show more".
      return this.loaded && (!this.next || (this.oldest && item.created_at >= this.oldest));
    },

    add(item) {
      if (cardsById.has(item.id)) return;
      const card = new Card({ name: item.file_name, size: item.size, session: false });
      card.claim(item.id);
      let before = null;
      for (const node of libraryList.children) {
        const other = known.get(node.dataset.itemId);
        if (other && other.created_at < item.created_at) { before = node; break; }
      }
      libraryList.insertBefore(card.node, before);
      card.setItem(item);
      this.updateEmpty();
    },

    async load(url) {
      libraryMore.disabled = true;
      const r = await api("GET", url);
      libraryMore.disabled = false;
      if (!r.ok) {
        libraryEmpty.hidden = false;
        libraryEmpty.textContent = `Your media could not be listed: ${r.message}`;
        return;
      }
      this.loaded = true;
      this.next = r.body.next;
      for (const item of r.body.results) {
        remember(item);
        if (!this.oldest || item.created_at < this.oldest) this.oldest = item.created_at;
      }
      for (const item of r.body.results) this.add(known.get(item.id));
      // Items the socket told us about while the list was loading.
      for (const item of known.values()) if (!cardsById.has(item.id) && this.fits(item)) this.add(item);
      libraryMore.hidden = !this.next;
      this.updateEmpty();
    },

    updateEmpty() {
      if (!library.loaded) return;
      libraryEmpty.textContent = uploadsList.childElementCount ? "No earlier uploads." : "Nothing uploaded yet.";
      libraryEmpty.hidden = libraryList.childElementCount > 0;
    },
  };

  libraryMore.addEventListener("click", () => { if (library.next) library.load(library.next); });

  function remember(item) {
    const previous = known.get(item.id);
    if (previous && previous.seq > item.seq) return null;
    // The list API leaves outputs out; keep what the socket said.
    const merged = previous && previous.seq === item.seq ? { ...previous, ...item } : item;
    known.set(item.id, merged);
    return merged;
  }

  function applyItem(item) {
    const merged = remember(item);
    if (!merged) return;
    const card = cardsById.get(item.id);
    if (card) card.setItem(merged);
    else if (library.fits(merged)) library.add(merged);
  }

  // --- live status -----------------------------------------------------------------------------

  const connection = document.getElementById("connection");
  let socketDelay = 1000;
  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}${config.urls.ws}`);
    let ping = null;
    ws.addEventListener("open", () => {
      socketDelay = 1000;
      setConnection("on", "Live updates: on");
      ping = window.setInterval(() => ws.readyState === 1 && ws.send('{"type":"ping"}'), 25000);
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (err) { return; }
      if (msg.type === "media.status" && msg.item) applyItem(msg.item);
    });
    ws.addEventListener("close", (event) => {
      window.clearInterval(ping);
      if (event.code === 4401) {
        setConnection("off", "Live updates: signed out — reload the page to sign in");
        return;
      }
      setConnection("off", `Live updates: reconnecting in ${Math.round(socketDelay / 1000)} s…`);
      window.setTimeout(connect, socketDelay);
      socketDelay = Math.min(socketDelay * 2, 30000);
    });
  }

  // --- uploads left unfinished by an earlier visit ---------------------------------------------

  const unfinished = {
    box: document.getElementById("unfinished"),
    list: document.getElementById("unfinished-list"),
    rows: new Map(),

    async show() {
      if (!tus.canStoreURLs) return;
      let stored = [];
      try { stored = await tus.defaultOptions.urlStorage.findAllUploads(); } catch (err) { return; }
      for (const entry of stored) {
        // Keys are "tus::<fingerprint>::<random>"; the fingerprint ends with the endpoint.
        const key = entry.urlStorageKey || "";
        const fingerprint = key.slice(5, key.lastIndexOf("::"));
        if (!entry.uploadUrl || !fingerprint.endsWith(`-${config.urls.tus}`)) continue;
        let offset = null;
        try {
          const res = await fetch(entry.uploadUrl, { method: "HEAD", headers: { "Tus-Resumable": "1.0.0" } });
          if (!res.ok) {
            // Finished, expired or deleted: nothing to resume.
            tus.defaultOptions.urlStorage.removeUpload(entry.urlStorageKey);
            continue;
          }
          offset = Number.parseInt(res.headers.get("Upload-Offset"), 10);
          if (offset >= entry.size) continue;
        } catch (err) { /* offline: still worth listing */ }
        this.add(entry, offset);
      }
    },

    add(entry, offset) {
      const name = (entry.metadata && entry.metadata.filename) || "A file";
      const sent = offset != null ? `${formatBytes(offset)} of ${formatBytes(entry.size)} sent` : formatBytes(entry.size);
      const discard = el("button", {
        type: "button", class: "button subtle", text: "Discard", "aria-label": `Discard the unfinished upload of ${name}`,
      });
      const row = el("li", { dataset: { key: entry.urlStorageKey } }, [
        el("span", {}, [el("strong", { text: name }), ` — ${sent}`]),
        discard,
      ]);
      discard.addEventListener("click", async () => {
        discard.disabled = true;
        try {
          await fetch(entry.uploadUrl, {
            method: "DELETE", credentials: "same-origin",
            headers: { "Tus-Resumable": "1.0.0", "X-CSRFToken": csrfToken },
          });
        } catch (err) { /* it expires on its own */ }
        tus.defaultOptions.urlStorage.removeUpload(entry.urlStorageKey);
        this.forget(entry.urlStorageKey);
        announce(`Discarded the unfinished upload of ${name}`);
      });
      this.rows.set(entry.urlStorageKey, row);
      this.list.append(row);
      this.box.hidden = false;
    },

    forget(key) {
      const row = this.rows.get(key);
      if (row) row.remove();
      this.rows.delete(key);
      this.box.hidden = this.rows.size === 0;
    },
  };

  // --- adding files ----------------------------------------------------------------------------

  function addFiles(files) {
    const list = Array.from(files || []);
    for (const file of list) {
      const card = new Card({ name: file.name, size: file.size, session: true });
      uploadsList.prepend(card.node);
      const refusal = clientRefusal(file);
      if (refusal) {
        card.refuse(refusal);
        announce(`${file.name} was not sent: ${refusal}`);
      } else {
        card.startUpload(file);
      }
    }
    if (list.length > 1) announce(`${list.length} files added`);
    library.updateEmpty();
  }

  const dropzone = document.getElementById("dropzone");
  const input = document.getElementById("file-input");
  document.getElementById("pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // so that the same file can be added again (to resume it)
  });

  const carriesFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      dropzone.classList.add("is-over");
    });
  }
  dropzone.addEventListener("dragleave", (event) => {
    if (!dropzone.contains(event.relatedTarget)) dropzone.classList.remove("is-over");
  });
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("is-over");
    addFiles(event.dataTransfer.files);
  });
  // A file dropped beside the zone must not make the browser leave the page.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => { if (carriesFiles(event)) event.preventDefault(); });
  }

  document.getElementById("limits-hint").textContent =
    `Up to ${formatBytes(limits.max_bytes)} per file. Accepted: ${describeAccepted()}. `
    + "Uploads continue after a reload: add the same file again.";

  // --- start -----------------------------------------------------------------------------------

  if (!window.tus || !tus.isSupported) {
    dropzone.append(el("p", { class: "error", text: "This browser cannot upload files in chunks; use a current browser." }));
    document.getElementById("pick").disabled = true;
  } else {
    unfinished.show();
  }
  library.load(`${config.urls.media}?page_size=20`);
  connect();
  document.documentElement.dataset.ready = "true"; // handlers are attached (tests wait for it)
})();
