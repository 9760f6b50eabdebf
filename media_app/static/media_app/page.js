/*
 * cpc-media upload page.
 *
 * Files go up with tus (tus-js-client, 8 MB chunks) through a queue: any number of files may be
 * picked or dropped, at most MAX_SENDING are sent at once, the rest wait in line (each can be
 * paused, resumed or removed). When the server says "not now" (429: too many uploads started, or
 * too many unfinished), the queue waits as Retry-After says (else backs off) and tries again.
 * tus-js-client remembers each upload's URL in localStorage under the file's fingerprint, so after
 * a reload the same file, picked again, continues at the offset the server holds.
 *
 * Status comes from one websocket (/ws/media/: every item of the user, a snapshot first, then each
 * change with a sequence number). "Your media" is a gallery of thumbnails; a result opens on
 * demand in a bounded preview, from signed URLs: video through dash.js from the DASH manifest,
 * falling back to the progressive WebM.
 *
 * Plain script, no build step: the libraries are vendored under vendor/<name>-<version>/.
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
  // Who takes the next step of an item that waits in a queue (the payload's "queue").
  const WORKERS = { video: "a video worker", default: "a worker" };
  // Places in line the server keeps fresh as the line moves (lifecycle.LINE_NOTIFY); a place
  // beyond may be out of date, and only "that many or more ahead" is sure.
  const LINE_SHOWN = 10;
  // Between two stages an item waits for a moment even on an idle worker: the wait is said only
  // once it lasts, so a file alone does not flicker "Waiting…" at every step.
  const WAIT_SHOWN_AFTER_MS = 1000;
  // Files sent at once: enough to keep the line busy, few enough that each moves visibly and the
  // server's limit of unfinished uploads per person is never reached by one page.
  const MAX_SENDING = 3;
  // Without Retry-After, "not now" from the server waits 2 s, 4 s, 8 s … up to a minute.
  const BACKOFF_FIRST_MS = 2000;
  const BACKOFF_MAX_MS = 60000;

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

  function waitingText(item) {
    const who = WORKERS[item.queue] || "a worker";
    const n = item.queue_position;
    if (!n) return `Waiting for ${who}`;
    return `Waiting for ${who} · ${n > LINE_SHOWN ? `${LINE_SHOWN} or more ahead` : `${ordinal(n)} in line`}`;
  }

  function ordinal(n) {
    const tens = n % 100;
    const suffix = tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
    return `${n}${suffix}`;
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

  function tusErrorBody(err) {
    const res = err && err.originalResponse;
    if (!res) return null;
    try {
      const body = JSON.parse(res.getBody());
      return body && body.error ? body.error : null;
    } catch (e) { return null; /* not JSON */ }
  }

  function tusErrorMessage(err) {
    const res = err && err.originalResponse;
    if (res) {
      const body = tusErrorBody(err);
      if (body && body.message) return body.message;
      if (res.getStatus() === 403) return "You are signed out or the page is out of date; reload it.";
      return `The server refused the upload (${res.getStatus()}).`;
    }
    return "The connection was lost.";
  }

  // "Not now" from the server: too many uploads started in a while, or too many unfinished. The
  // file is fine; waiting helps. Returns the wait in ms (Retry-After when given), else null.
  function serverSaysWait(err) {
    const res = err && err.originalResponse;
    if (!res) return null;
    const body = tusErrorBody(err);
    const code = body && body.code;
    if (res.getStatus() !== 429 && code !== "too_many_uploads" && code !== "rate_limited") return null;
    const header = res.getHeader("Retry-After");
    const seconds = header != null ? Number.parseInt(header, 10) : Number.NaN;
    return Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : 0;
  }

  function describeAccepted() {
    // The server groups the endings by kind, from the same table its sniffer uses.
    const groups = {};
    for (const [kind, exts] of Object.entries(limits.extensions_by_kind || {})) {
      groups[kind] = exts.map((ext) => ext.slice(1).toUpperCase());
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

  // --- cards ---------------------------------------------------------------------------------

  const template = document.getElementById("card-template");
  const uploadsList = document.getElementById("uploads");
  const libraryList = document.getElementById("library");
  const libraryEmpty = document.getElementById("library-empty");
  const libraryMore = document.getElementById("library-more");
  const known = new Map(); // item id -> latest state (highest seq)
  const cardsById = new Map(); // item id -> Card (on the page, in either list)
  const deleted = new Set(); // item ids deleted here: a status event arriving late is ignored
  let cardCount = 0;

  // Upload phases of a card made on this page. After "uploaded" the server's status speaks.
  //   queued   waiting in line (or for the server to accept more)
  //   sending  bytes on the way
  //   paused   held by the person; keeps its place and what was sent
  //   stopped  the connection failed; "Resume upload" puts it back in line
  //   uploaded the last byte is in
  //   recording  a camera recording published from this page (WHIP), until Stop
  const UPLOAD_PHASES = ["queued", "sending", "paused", "stopped", "recording"];

  class Card {
    constructor({ name, size, session, file = null }) {
      this.n = ++cardCount;
      this.name = name;
      this.size = size;
      this.session = session;
      this.file = file;
      this.phase = session ? "new" : "server";
      this.itemId = null;
      this.item = null;
      this.upload = null;
      this.resultsShown = false;
      this.detail = null;
      this.detailAt = 0;
      this.node = template.content.firstElementChild.cloneNode(true);
      this.node.dataset.card = String(this.n);
      this.q = (sel) => this.node.querySelector(sel);
      this.q("[data-name]").textContent = name;
      this.badge = this.q("[data-badge]");
      this.thumb = this.q("[data-thumb]");
      this.thumb.hidden = session; // a gallery tile always has its frame; an upload row only with a picture
      for (const role of ["upload", "process"]) {
        const box = this.q(`[data-box="${role}"]`);
        const bar = box.querySelector("progress");
        bar.id = `${role}-bar-${this.n}`;
        box.querySelector("label").htmlFor = bar.id;
        const text = box.querySelector("[data-text]");
        text.id = `${role}-text-${this.n}`;
        bar.setAttribute("aria-describedby", text.id);
      }
      this.pauseButton = this.q('[data-action="pause"]');
      this.retryButton = this.q('[data-action="retry"]');
      this.cancelButton = this.q('[data-action="cancel"]');
      this.pauseButton.addEventListener("click", () => this.togglePause());
      this.retryButton.addEventListener("click", () => this.retry());
      this.cancelButton.addEventListener("click", () => this.cancel());
      this.setRetry(false);
      if (session) {
        // Upload rows: the buttons sit beside the name, so a long line of files stays short.
        this.q(".card-head").append(this.q(".actions"));
      } else {
        // Gallery tiles: results link and buttons share one line under the picture.
        const foot = el("div", { class: "card-foot" });
        this.q("[data-results]").before(foot);
        foot.append(this.q("[data-results]"), this.q(".actions"));
      }
      this.setMeta();
      this.setCancelLabel("Cancel");
    }

    get inUpload() { return UPLOAD_PHASES.includes(this.phase); }

    setMeta() {
      const parts = [formatBytes(this.size)];
      if (this.probed) parts.push(this.probed); // what the browser read of the file (ffmpeg.wasm)
      else if (this.item && this.item.kind) parts.push(this.item.kind);
      if (this.item && this.item.created_at && !this.session) {
        parts.push(new Date(this.item.created_at).toLocaleString());
      }
      this.q("[data-meta]").textContent = parts.join(" · ");
      this.thumb.dataset.kind = (this.item && this.item.kind) || "";
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

    setPauseLabel(label) {
      this.pauseButton.hidden = !label;
      if (!label) return;
      this.pauseButton.textContent = label;
      this.pauseButton.setAttribute("aria-label", `${label} ${this.name}`);
    }

    setRetry(shown, label = "Retry") {
      this.retryButton.hidden = !shown;
      this.retryButton.textContent = label;
      this.retryButton.setAttribute("aria-label", `${label} ${this.name}`);
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

    setThumb(url, placeholder) {
      const img = this.thumb.querySelector("img");
      if (!url || img.getAttribute("src") === url) return;
      // The ThumbHash is painted behind the picture until it has loaded (issue 18).
      if (placeholder) paintPlaceholder(img, placeholder);
      img.decoding = "async";
      img.src = url;
      img.hidden = false;
      this.thumb.hidden = false;
    }

    claim(itemId) {
      // This card now stands for a server item: a row for the same item elsewhere gives way.
      if (!itemId || this.itemId === itemId) return;
      this.itemId = itemId;
      this.node.dataset.itemId = itemId;
      const other = cardsById.get(itemId);
      if (other && other !== this) {
        other.clearResults();
        other.node.remove();
      }
      cardsById.set(itemId, this);
      library.updateEmpty();
      const state = known.get(itemId);
      if (state) this.setItem(state);
    }

    // Upload side ------------------------------------------------------------------------------

    sentSoFar() {
      const bar = this.q('[data-bar="upload"]');
      return Math.round((Number(bar.value) / 100) * this.size);
    }

    enqueue() {
      this.phase = "queued";
      this.setState("queued");
      this.setBadge("Queued", "wait");
      this.error("");
      this.setPauseLabel("Pause");
      this.setRetry(false);
      this.setCancelLabel(this.itemId ? "Cancel" : "Remove");
      queue.update();
    }

    showWaiting(position, heldSeconds) {
      // Called by the queue for every waiting card: its place in line (and the server's wait;
      // why the server asked to wait is said once, above the line).
      const bar = this.q('[data-bar="upload"]');
      const text = heldSeconds > 0
        ? `Waiting for the server · trying again in ${heldSeconds} s · ${ordinal(position)} in line`
        : `Waiting to send · ${ordinal(position)} in line`;
      this.bar("upload", Number(bar.value) || 0, text);
    }

    send() {
      this.phase = "sending";
      this.setState("uploading");
      this.setBadge("Uploading", "busy");
      this.setPauseLabel("Pause");
      this.setCancelLabel("Cancel");
      if (this.upload) {
        this.bar("upload", null, "Continuing…");
        this.upload.start(); // resumes: tus asks the server for the offset first
        return;
      }
      const file = this.file;
      this.bar("upload", 0, "Starting…");
      const samples = [];
      const upload = new tus.Upload(file, {
        endpoint: config.urls.tus,
        chunkSize: config.chunk_bytes,
        retryDelays: [0, 1000, 3000, 5000, 10000],
        metadata: { filename: file.name, filetype: file.type },
        headers: { "X-CSRFToken": csrfToken },
        removeFingerprintOnSuccess: true,
        onUploadUrlAvailable: () => {
          queue.sent();
          this.claim(itemIdFromUrl(upload.url));
        },
        onAfterResponse: (req, res) => {
          if (req.getMethod() !== "HEAD" || res.getStatus() >= 300 || this.resumedAt != null) return;
          const offset = Number.parseInt(res.getHeader("Upload-Offset"), 10);
          if (offset > 0 && this.resumedFromEarlier) {
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
        onError: (err) => this.sendFailed(err),
      });
      this.upload = upload;
      upload.findPreviousUploads().then((previous) => {
        if (this.phase !== "sending") return; // paused or removed while looking
        if (previous.length) {
          previous.sort((a, b) => new Date(b.creationTime) - new Date(a.creationTime));
          upload.resumeFromPreviousUpload(previous[0]);
          this.resumedFromEarlier = true;
          unfinished.resumed(previous[0].urlStorageKey, this.name);
          this.note("Looking up the part already uploaded…");
        }
        upload.start();
      });
    }

    sendFailed(err) {
      if (this.phase !== "sending") return;
      const wait = serverSaysWait(err);
      if (wait != null) {
        // Not the file's fault: back in line, first to go once the server takes more.
        const body = tusErrorBody(err);
        queue.hold(wait, (body && body.message) || "The server is busy.", body && body.code);
        this.enqueue();
        queue.toFront(this);
        return;
      }
      const message = tusErrorMessage(err);
      const status = err && err.originalResponse ? err.originalResponse.getStatus() : 0;
      this.setPauseLabel(null);
      this.setCancelLabel(this.itemId ? "Delete" : "Remove");
      if (status === 0 || status >= 500) {
        // A lost connection (tus already retried): what is stored stays; the person may go on.
        this.phase = "stopped";
        this.setState("failed");
        this.setBadge("Upload stopped", "bad");
        this.error(`${message} Resume the upload to continue where it stopped.`);
        this.setRetry(true, "Resume upload");
        announce(`${this.name}: upload stopped. ${message}`);
      } else {
        // A refusal (not a file we accept, too large, over quota): sending again cannot help.
        // If the server made the item Failed, its status (and reason) speaks from now on.
        this.phase = "refused";
        this.file = null;
        this.setState("failed");
        this.setBadge("Failed", "bad");
        this.error(message);
        this.setRetry(false);
        announce(`${this.name}: upload refused. ${message}`);
        const state = this.itemId ? known.get(this.itemId) : null;
        if (state && state.status === "Failed") this.setItem(state);
      }
      queue.update();
    }

    togglePause() {
      if (this.phase === "paused") {
        this.note("");
        this.enqueue();
        announce(`${this.name}: back in line`);
        return;
      }
      if (this.phase !== "queued" && this.phase !== "sending") return;
      if (this.phase === "sending" && this.upload) this.upload.abort(false); // keeps what is stored
      this.phase = "paused";
      this.setState("paused");
      this.setBadge("Paused", "wait");
      this.setPauseLabel("Resume");
      this.setCancelLabel(this.itemId ? "Cancel" : "Remove");
      const sent = this.sentSoFar();
      this.bar("upload", null, sent > 0 ? `Paused at ${formatBytes(sent)} of ${formatBytes(this.size)}` : "Paused");
      announce(`${this.name}: paused`);
      queue.update();
    }

    uploaded() {
      this.phase = "uploaded";
      this.file = null; // nothing more to send: let the browser drop it
      this.setPauseLabel(null);
      this.bar("upload", 100, `Uploaded ${formatBytes(this.size)}`);
      this.note(""); // "Resumed at …" was about the upload, which is done
      announce(`${this.name}: uploaded, waiting for processing`);
      queue.update();
      const state = this.itemId ? known.get(this.itemId) : null;
      if (state && state.status !== "Pending") this.setItem(state);
      else {
        this.setState("pending");
        this.setBadge("Pending", "wait");
        this.setCancelLabel("Cancel");
        this.bar("process", 0, "Waiting to start…");
      }
      if (this.itemId) {
        api("GET", `${config.urls.media}${this.itemId}`).then((r) => { if (r.ok) applyItem(r.body); });
      }
    }

    refuse(message) {
      this.phase = "refused";
      this.setState("refused");
      this.setBadge("Not sent", "bad");
      this.error(message);
      this.setCancelLabel("Remove");
    }

    // Recording side (a camera recording published from this page) ---------------------------

    recording(source) {
      this.phase = "recording";
      this.setState("uploading");
      this.setBadge("Recording", "busy");
      this.q('[data-box="upload"] [data-label]').textContent = "Recording";
      this.q('[data-bar="upload"]').removeAttribute("value"); // live: no end to measure against
      this.q("[data-meta]").textContent = source === "screen" ? "Live from your screen" : "Live from your camera";
      this.cancelButton.hidden = true; // Stop (above) ends it
    }

    recorded(seconds) {
      this.phase = "uploaded";
      this.cancelButton.hidden = false;
      this.bar("upload", 100, `Recorded ${formatClock(seconds)}`);
      announce(`${this.name}: recorded, waiting for processing`);
      const state = this.itemId ? known.get(this.itemId) : null;
      if (state && state.status !== "Pending") this.setItem(state);
      else {
        this.setState("pending");
        this.setBadge("Pending", "wait");
        this.setCancelLabel("Cancel");
        this.bar("process", 0, "Waiting to start…");
      }
      if (this.itemId) {
        api("GET", `${config.urls.media}${this.itemId}`).then((r) => { if (r.ok) applyItem(r.body); });
      }
    }

    // Server side ------------------------------------------------------------------------------

    setItem(item) {
      const before = this.item ? this.item.status : null;
      if (item.waiting && !(this.item && this.item.waiting)) this.waitFrom = performance.now();
      this.item = item;
      // The server's time left counts down here until the next event brings a new one.
      this.etaFrom = item.eta_seconds != null ? performance.now() : null;
      if (item.size) this.size = item.size;
      this.setMeta();
      if (this.inUpload) return; // the upload bar speaks until the last byte is in
      const status = item.status;
      this.setState(status.toLowerCase());
      this.setBadge(status, TONES[status]);
      // Retry only where it can change the outcome: the server says so (a damaged file fails
      // the same way every time; an upload that is gone cannot be processed again).
      this.setRetry(status === "Failed" && item.retryable === true);
      this.setCancelLabel(status === "Completed" || status === "Failed" ? "Delete" : "Cancel");
      // Past Pending the upload is history: one bar (processing) says where the file is.
      if (this.session && status !== "Pending" && this.phase === "uploaded") this.hideBar("upload");
      if (status === "Failed") {
        this.error(item.error ? item.error.message : "Processing failed.");
        this.hideBar("process");
      } else {
        this.error("");
      }
      this.node.dataset.waiting = String(status === "Pending" && Boolean(item.waiting));
      if (status === "Pending") {
        if (item.waiting || this.session) this.bar("process", 0, item.waiting ? waitingText(item) : "Waiting to start…");
      } else if (status === "Processing") {
        this.showProcessing();
      } else if (status === "Completed") {
        const took = item.started_at && item.finished_at
          ? ` in ${formatDuration((new Date(item.finished_at) - new Date(item.started_at)) / 1000)}` : "";
        this.bar("process", 100, `Done${took}`);
        if (!this.session) this.hideBar("process");
        this.showResults();
      }
      if (status !== "Completed" && this.resultsShown) this.clearResults(); // reprocessing
      if (before !== status && before !== null) {
        const reason = status === "Failed" && item.error ? ` ${item.error.message}` : "";
        announce(`${this.name}: ${status}.${reason}`);
      }
    }

    showProcessing() {
      // Between stages the next one waits for a worker: say so, with the place in line, rather
      // than the name of a stage that is over.
      const item = this.item;
      const waiting = item.waiting && performance.now() - this.waitFrom >= WAIT_SHOWN_AFTER_MS;
      this.node.dataset.waiting = String(waiting);
      const parts = [waiting ? waitingText(item) : STAGES[item.stage] || item.stage || "Starting", `${item.progress}%`];
      if (this.etaFrom != null) {
        // Counted down from when it was told; once spent, no number is better than a wrong one.
        const left = item.eta_seconds - (performance.now() - this.etaFrom) / 1000;
        if (left >= 1) parts.push(`about ${formatDuration(left)} left`);
      }
      if (item.attempts > 1) parts.push(`attempt ${item.attempts}`);
      this.bar("process", item.progress, parts.join(" · "));
    }

    gone() {
      // Deleted here, in another tab or by an admin: the card goes, and nothing is offered.
      if (this.upload && this.inUpload) this.upload.abort(false).catch(() => {});
      this.phase = "removed";
      this.clearResults();
      this.node.remove();
      if (this.itemId) cardsById.delete(this.itemId);
      queue.update();
      library.updateEmpty();
    }

    async loadDetail() {
      // Signed URLs last a while; a detail older than 5 minutes is asked for again.
      if (this.detail && performance.now() - this.detailAt < 300000) return this.detail;
      const r = await api("GET", `${config.urls.media}${this.itemId}`);
      if (!r.ok) throw new Error(r.message);
      this.detail = r.body;
      this.detailAt = performance.now();
      const outputs = {};
      for (const out of r.body.outputs || []) outputs[out.role] = out;
      const thumb = outputs.thumbnail || outputs.image_webp;
      if (thumb) this.setThumb(thumb.url, r.body.placeholder);
      return r.body;
    }

    showResults() {
      if (this.resultsShown || !this.itemId) return;
      this.resultsShown = true;
      const box = this.q("[data-results]");
      box.hidden = false;
      box.replaceChildren();
      // A result opens on demand, in a bounded preview: no player is made, and no full-size
      // picture decoded, for a card nobody opened.
      const details = el("details", { class: "more" }, [el("summary", {
        text: "Show result", "aria-label": `Show the result of ${this.name}`,
      })]);
      const inner = el("div", { class: "results" });
      details.append(inner);
      details.addEventListener("toggle", async () => {
        this.node.classList.toggle("is-open", details.open);
        if (!details.open || inner.childElementCount) return;
        try {
          renderResults(inner, await this.loadDetail(), this);
        } catch (err) {
          inner.append(el("p", { class: "error", text: err.message }));
        }
      });
      box.append(details);
      this.details = details;
      // The thumbnail: at once for a file of this visit, when scrolled into view for the gallery.
      if (this.session) this.loadDetail().catch(() => {});
      else library.watch(this);
      this.thumb.querySelector("img").alt = `Thumbnail of ${this.name}`;
    }

    clearResults() {
      this.resultsShown = false;
      this.detail = null;
      this.node.classList.remove("is-open");
      const box = this.q("[data-results]");
      for (const video of box.querySelectorAll("video")) if (video._player) video._player.reset();
      box.replaceChildren();
      box.hidden = true;
    }

    // Actions ----------------------------------------------------------------------------------

    async retry() {
      if (this.phase === "stopped") {
        this.enqueue();
        announce(`${this.name}: back in line`);
        return;
      }
      if (!this.itemId) return;
      this.retryButton.disabled = true;
      const r = await api("POST", `${config.urls.media}${this.itemId}/retry`);
      this.retryButton.disabled = false;
      if (!r.ok) {
        // The server explains why not (the upload is gone, …): the button has done its part.
        this.setRetry(false);
        this.error(r.message);
        announce(`${this.name}: ${r.message}`);
        return;
      }
      this.clearResults();
      announce(`${this.name}: retrying`);
      applyItem(r.body);
    }

    async cancel() {
      const label = this.cancelButton.textContent;
      this.cancelButton.disabled = true;
      const wasUploading = this.inUpload;
      this.phase = "removed";
      queue.update();
      if (this.upload && wasUploading) {
        // Terminates the tus upload (DELETE), which removes the item and its bytes.
        try { await this.upload.abort(true); } catch (err) { /* gone already */ }
      } else if (this.itemId) {
        const r = await api("DELETE", `${config.urls.media}${this.itemId}`);
        if (!r.ok && r.status !== 404) {
          this.cancelButton.disabled = false;
          this.phase = "server";
          this.error(r.message);
          return;
        }
      }
      this.clearResults();
      this.node.remove();
      if (this.itemId) {
        deleted.add(this.itemId);
        cardsById.delete(this.itemId);
        known.delete(this.itemId);
      }
      const done = { Delete: "deleted", Remove: "removed" }[label] || "cancelled";
      announce(`${this.name}: ${done}`);
      library.updateEmpty();
      if (this.itemId) queue.poke();
    }
  }

  // --- the upload queue ------------------------------------------------------------------------

  const queue = {
    cards: [], // in the order files were added
    holdUntil: 0,
    holdText: "",
    holdCode: "",
    holds: 0, // "not now" answers in a row, for the backoff
    timer: null,
    box: document.getElementById("queue"),
    summary: document.getElementById("queue-summary"),
    held: document.getElementById("queue-held"),
    pauseAll: document.getElementById("queue-pause"),
    resumeAll: document.getElementById("queue-resume"),

    add(card) {
      this.cards.push(card);
      card.enqueue();
    },

    toFront(card) {
      this.cards.splice(this.cards.indexOf(card), 1);
      this.cards.unshift(card);
      this.update();
    },

    hold(ms, message, code) {
      // Retry-After when the server gave one, else 2 s, 4 s, 8 s … (with a little jitter, so
      // several tabs do not come back at the same instant).
      this.holds += 1;
      const backoff = Math.min(BACKOFF_FIRST_MS * 2 ** (this.holds - 1), BACKOFF_MAX_MS);
      const wait = ms > 0 ? ms : backoff * (0.9 + Math.random() * 0.2);
      const first = this.holdUntil <= Date.now();
      this.holdUntil = Math.max(this.holdUntil, Date.now() + wait);
      this.holdText = message;
      this.holdCode = code || "";
      if (first) announce(`The server asks to wait: ${message}`);
    },

    poke() {
      // Something of this person's was deleted: if the server was waiting for one of their
      // unfinished uploads to go, there may be room now, so try at once.
      if (this.holdCode !== "too_many_uploads" || this.holdUntil <= Date.now()) return;
      this.holdUntil = 0;
      this.holds = 0;
      this.update();
    },

    update() {
      window.clearTimeout(this.timer);
      this.timer = null;
      this.cards = this.cards.filter((c) => c.phase !== "removed");
      const sending = this.cards.filter((c) => c.phase === "sending").length;
      const held = this.holdUntil - Date.now();
      if (held > 0) {
        this.timer = window.setTimeout(() => this.update(), Math.min(held, 1000));
      } else {
        this.holdUntil = 0;
        let free = MAX_SENDING - sending;
        for (const card of this.cards) {
          if (free <= 0) break;
          if (card.phase === "queued") { card.send(); free -= 1; }
        }
      }
      this.render(held > 0 ? Math.ceil(held / 1000) : 0);
    },

    sent() {
      // A create the server accepted: the next "not now" starts the backoff afresh.
      this.holds = 0;
    },

    render(heldSeconds) {
      let position = 0;
      const count = { queued: 0, sending: 0, paused: 0, stopped: 0, uploaded: 0 };
      for (const card of this.cards) {
        if (card.phase in count) count[card.phase] += 1;
        if (card.phase !== "queued") continue;
        position += 1;
        card.showWaiting(position, heldSeconds);
      }
      const unfinishedCount = count.queued + count.sending + count.paused + count.stopped;
      this.box.hidden = this.cards.length < 2 && !count.paused;
      const parts = [`${count.uploaded} of ${this.cards.length} sent`];
      if (count.sending) parts.push(`${count.sending} sending`);
      if (count.queued) parts.push(`${count.queued} waiting`);
      if (count.paused) parts.push(`${count.paused} paused`);
      if (count.stopped) parts.push(`${count.stopped} stopped`);
      this.summary.textContent = `Uploads: ${parts.join(" · ")}`;
      this.held.hidden = !(heldSeconds > 0 && count.queued);
      this.held.textContent = heldSeconds > 0
        ? `The server asked to wait: ${this.holdText} Trying again in ${heldSeconds} s.` : "";
      this.pauseAll.hidden = !(count.queued + count.sending);
      this.resumeAll.hidden = !count.paused;
      this.box.dataset.active = String(unfinishedCount);
    },
  };

  queue.pauseAll.addEventListener("click", () => {
    for (const card of [...queue.cards]) if (card.phase === "queued" || card.phase === "sending") card.togglePause();
  });
  queue.resumeAll.addEventListener("click", () => {
    for (const card of [...queue.cards]) if (card.phase === "paused") card.togglePause();
  });

  // --- placeholders (ThumbHash), storyboards and the quality menu (issue 18) ------------------

  // Decode a ThumbHash (base64) into a small PNG data URL: the public-domain algorithm, the same
  // as pipelines/placeholder.py decodes in the tests.
  function thumbHashDataUrl(b64) {
    let hash;
    try { hash = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); } catch { return null; }
    if (hash.length < 5) return null;
    const { PI, min, max, cos, round } = Math;
    const header24 = hash[0] | (hash[1] << 8) | (hash[2] << 16);
    const header16 = hash[3] | (hash[4] << 8);
    const lDc = (header24 & 63) / 63;
    const pDc = ((header24 >> 6) & 63) / 31.5 - 1;
    const qDc = ((header24 >> 12) & 63) / 31.5 - 1;
    const lScale = ((header24 >> 18) & 31) / 31;
    const hasAlpha = header24 >> 23;
    const pScale = ((header16 >> 3) & 63) / 63;
    const qScale = ((header16 >> 9) & 63) / 63;
    const isLandscape = header16 >> 15;
    const lx = max(3, isLandscape ? (hasAlpha ? 5 : 7) : header16 & 7);
    const ly = max(3, isLandscape ? header16 & 7 : (hasAlpha ? 5 : 7));
    const aDc = hasAlpha ? (hash[5] & 15) / 15 : 1;
    const aScale = (hash[5] >> 4) / 15;
    const acStart = hasAlpha ? 6 : 5;
    let acIndex = 0;
    const channel = (nx, ny, scale) => {
      const ac = [];
      for (let cy = 0; cy < ny; cy++) {
        for (let cx = cy ? 0 : 1; cx * ny < nx * (ny - cy); cx++, acIndex++) {
          ac.push((((hash[acStart + (acIndex >> 1)] >> ((acIndex & 1) << 2)) & 15) / 7.5 - 1) * scale);
        }
      }
      return ac;
    };
    const lAc = channel(lx, ly, lScale);
    const pAc = channel(3, 3, pScale * 1.25);
    const qAc = channel(3, 3, qScale * 1.25);
    const aAc = hasAlpha ? channel(5, 5, aScale) : [];
    const ratio = (isLandscape ? (hasAlpha ? 5 : 7) : header16 & 7) / (isLandscape ? header16 & 7 : (hasAlpha ? 5 : 7));
    const w = round(ratio > 1 ? 32 : 32 * ratio);
    const h = round(ratio > 1 ? 32 / ratio : 32);
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(w, h);
    const fx = [];
    const fy = [];
    for (let y = 0, i = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i += 4) {
        let l = lDc, p = pDc, q = qDc, a = aDc;
        for (let cx = 0, n = max(lx, hasAlpha ? 5 : 3); cx < n; cx++) fx[cx] = cos((PI / w) * (x + 0.5) * cx);
        for (let cy = 0, n = max(ly, hasAlpha ? 5 : 3); cy < n; cy++) fy[cy] = cos((PI / h) * (y + 0.5) * cy);
        for (let cy = 0, j = 0; cy < ly; cy++) {
          for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx * ly < lx * (ly - cy); cx++, j++) l += lAc[j] * fx[cx] * fy2;
        }
        for (let cy = 0, j = 0; cy < 3; cy++) {
          for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx < 3 - cy; cx++, j++) {
            const f = fx[cx] * fy2;
            p += pAc[j] * f;
            q += qAc[j] * f;
          }
        }
        if (hasAlpha) {
          for (let cy = 0, j = 0; cy < 5; cy++) {
            for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx < 5 - cy; cx++, j++) a += aAc[j] * fx[cx] * fy2;
          }
        }
        const b = l - (2 / 3) * p;
        const r = (3 * l - b + q) / 2;
        const g = r - q;
        image.data[i] = max(0, 255 * min(1, r));
        image.data[i + 1] = max(0, 255 * min(1, g));
        image.data[i + 2] = max(0, 255 * min(1, b));
        image.data[i + 3] = max(0, 255 * min(1, a));
      }
    }
    ctx.putImageData(image, 0, 0);
    return canvas.toDataURL("image/png");
  }

  // Paint the placeholder behind an <img> (or as a <video>'s poster) until the real picture loads.
  function paintPlaceholder(node, placeholder) {
    const url = placeholder && thumbHashDataUrl(placeholder);
    if (!url || !node) return;
    node.style.backgroundImage = `url("${url}")`;
    node.style.backgroundSize = "cover";
    node.dataset.placeholder = "painted";
    const clear = () => { node.style.backgroundImage = ""; node.dataset.placeholder = "cleared"; };
    if (node.tagName === "IMG") {
      if (node.complete && node.naturalWidth) clear();
      else node.addEventListener("load", clear, { once: true });
    } else if (node.tagName === "VIDEO") {
      node.addEventListener("loadeddata", clear, { once: true });
    }
  }

  // WebVTT storyboard cues: [{start, end, x, y, w, h}], the sheet's own URL given separately
  // (signed URLs: the VTT's relative name cannot be fetched as it is).
  async function loadStoryboard(vttUrl) {
    const r = await fetch(vttUrl);
    if (!r.ok) return [];
    const text = await r.text();
    const cues = [];
    const ts = (s) => { const [h, m, rest] = s.split(":"); return +h * 3600 + +m * 60 + parseFloat(rest); };
    const lines = text.split(/\r?\n/);
    for (let i = 0; i < lines.length; i++) {
      const m = lines[i].match(/^(\S+) --> (\S+)/);
      const box = m && (lines[i + 1] || "").match(/#xywh=(\d+),(\d+),(\d+),(\d+)/);
      if (box) cues.push({ start: ts(m[1]), end: ts(m[2]), x: +box[1], y: +box[2], w: +box[3], h: +box[4] });
    }
    return cues;
  }

  // A seek strip under the player: hovering shows the storyboard tile of that time, a click seeks.
  function storyboardStrip(video, outputs) {
    if (!outputs.storyboard || !outputs.storyboard_vtt) return null;
    const tile = el("div", { class: "storyboard-tile", hidden: true, "data-storyboard-tile": "" });
    const label = el("span", { class: "storyboard-time" });
    tile.append(label);
    const strip = el("div", {
      class: "storyboard-strip", role: "slider", tabindex: "0", "aria-label": "Seek (hover for a preview)",
      "aria-valuemin": "0", "data-storyboard-strip": "",
    }, [tile]);
    let cues = [];
    loadStoryboard(outputs.storyboard_vtt.url)
      .then((found) => { cues = found; strip.dataset.cues = String(found.length); })
      .catch(() => { strip.dataset.cues = "0"; });
    const timeAt = (event) => {
      const rect = strip.getBoundingClientRect();
      const frac = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
      const duration = video.duration || (cues.length ? cues[cues.length - 1].end : 0);
      return { frac, t: frac * duration };
    };
    strip.addEventListener("mousemove", (event) => {
      const { frac, t } = timeAt(event);
      const cue = cues.find((c) => t >= c.start && t < c.end) || cues[cues.length - 1];
      if (!cue) return;
      tile.hidden = false;
      tile.style.width = `${cue.w}px`;
      tile.style.height = `${cue.h}px`;
      tile.style.backgroundImage = `url("${outputs.storyboard.url}")`;
      tile.style.backgroundPosition = `-${cue.x}px -${cue.y}px`;
      tile.style.left = `calc(${(frac * 100).toFixed(2)}% - ${cue.w / 2}px)`;
      tile.dataset.cueStart = String(cue.start);
      label.textContent = formatDuration(t);
    });
    strip.addEventListener("mouseleave", () => { tile.hidden = true; });
    strip.addEventListener("click", (event) => { video.currentTime = timeAt(event).t; });
    return strip;
  }

  // Quality: "Auto" (dash.js's ABR) or one rung of the playing adaptation set.
  function qualityMenu(player, video) {
    const dash = window.dashjs;
    const select = el("select", { class: "quality", "aria-label": "Quality", "data-quality": "" });
    const fill = () => {
      // dash.js lists a set's rungs by rising bandwidth; the menu shows the largest first.
      const reps = (player.getRepresentationsByType("video") || []).map((rep, index) => ({ rep, index }));
      reps.sort((a, b) => (b.rep.bandwidth || 0) - (a.rep.bandwidth || 0));
      select.replaceChildren(el("option", { value: "auto", text: "Auto" }));
      for (const { rep, index } of reps) {
        const kbps = rep.bandwidth ? ` · ${Math.round(rep.bandwidth / 1000)} kb/s` : "";
        select.append(el("option", { value: String(index), text: `${Math.min(rep.width, rep.height)}p${kbps}` }));
      }
    };
    player.on(dash.MediaPlayer.events.STREAM_INITIALIZED, fill);
    player.on(dash.MediaPlayer.events.QUALITY_CHANGE_RENDERED, (e) => {
      if (e.mediaType !== "video") return;
      const rep = e.newRepresentation;
      video.dataset.representation = rep ? `${rep.width}x${rep.height}` : "";
      video.dataset.codec = rep && rep.codecs ? rep.codecs.split(".")[0] : "";
    });
    select.addEventListener("change", () => {
      const auto = select.value === "auto";
      player.updateSettings({ streaming: { abr: { autoSwitchBitrate: { video: auto } } } });
      if (!auto) player.setRepresentationForTypeByIndex("video", Number(select.value), true);
    });
    return select;
  }

  // --- results ---------------------------------------------------------------------------------

  function renderResults(box, detail, card) {
    const outputs = {};
    for (const out of detail.outputs || []) outputs[out.role] = out;
    const name = detail.file_name;
    const thumb = outputs.thumbnail || outputs.image_webp;
    if (thumb) card.setThumb(thumb.url, detail.placeholder);
    if (detail.kind === "video" && (outputs.manifest || outputs.video)) {
      box.append(videoPlayer(outputs, name, detail.placeholder));
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
        // width/height give the box its shape before the bytes arrive; CSS bounds it.
        el("img", {
          src: fallback.url, alt: `Processed image: ${name}`, width: fallback.width, height: fallback.height,
          decoding: "async", loading: "lazy",
        }),
      ]);
      paintPlaceholder(picture.querySelector("img"), detail.placeholder);
      box.append(el("figure", { class: "player" }, [picture, el("figcaption", {
        text: `${outputs.image_avif ? "AVIF" : ""}${outputs.image_avif && outputs.image_webp ? " with WebP fallback" : ""}`
          + `${!outputs.image_avif ? "WebP" : ""} · ${fallback.width}×${fallback.height}`,
      })]));
    }
    box.append(sizeList(detail, outputs));
  }

  function videoPlayer(outputs, name, placeholder) {
    const video = el("video", {
      controls: true, playsinline: true, preload: "metadata", poster: outputs.thumbnail && outputs.thumbnail.url,
      "aria-label": `Processed video: ${name}`,
    });
    paintPlaceholder(video, placeholder);
    let menu = null;
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
        // The AV1 set is first in the manifest, VP9 after: dash.js drops what the browser cannot
        // decode (MediaSource.isTypeSupported), so AV1 plays where it can and VP9 elsewhere.
        streaming: { utcSynchronization: { enabled: false }, selectionModeForInitialTrack: "firstTrack" },
      });
      player.on(dash.MediaPlayer.events.ERROR, () => progressive("the stream could not be played"));
      menu = qualityMenu(player, video);
      // The caption names what dash.js plays (VP9 or the operator's H.264/AAC where the browser
      // refuses AV1 or Opus) and the size of the rung it plays, not the download's.
      const playing = () => {
        if (video.dataset.source !== "dash") return;
        const reps = ["video", "audio"].map((type) => player.getCurrentRepresentationForType(type));
        const names = reps.map((rep) => (rep && rep.codecs ? dashCodecName(rep.codecs) : null)).filter(Boolean);
        const rung = reps[0] && reps[0].width ? ` · ${reps[0].width}×${reps[0].height}` : dims;
        caption.textContent = `DASH stream (dash.js) · ${names.length ? names.join(" + ") : codecs}${rung}`;
      };
      player.on(dash.MediaPlayer.events.QUALITY_CHANGE_RENDERED, playing);
      player.on(dash.MediaPlayer.events.TRACK_CHANGE_RENDERED, playing);
      player.on(dash.MediaPlayer.events.PLAYBACK_PLAYING, playing);
      player.initialize(video, outputs.manifest.url, false);
      video._player = player;
      video.dataset.source = "dash";
      caption.textContent = `DASH stream (dash.js) · ${codecs}${dims}`;
    } else {
      progressive(outputs.manifest ? "this browser has no Media Source Extensions" : "");
    }
    const strip = storyboardStrip(video, outputs);
    const controls = menu ? el("label", { class: "quality-label" }, ["Quality ", menu]) : null;
    return el("figure", { class: "player" }, [video, strip, controls, caption]);
  }

  // A DASH codecs string (RFC 6381: "av01.0.04M.08", "mp4a.40.2", "opus") by its family.
  function dashCodecName(codecs) {
    const family = codecs.split(".")[0].toLowerCase();
    const names = { av01: "AV1", vp09: "VP9", vp9: "VP9", avc1: "H.264", avc3: "H.264", opus: "Opus", mp4a: "AAC" };
    return names[family] || family;
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

  // --- "Your media": a gallery of the earlier items ------------------------------------------

  const library = {
    loaded: false,
    next: null,
    oldest: null,
    // Gallery thumbnails are asked for (one detail read each) only when a tile scrolls into view.
    observer: "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        library.observer.unobserve(entry.target);
        const card = cardsById.get(entry.target.dataset.itemId);
        if (card && card.resultsShown) card.loadDetail().catch(() => {});
      }
    }, { rootMargin: "200px" }) : null,

    watch(card) {
      if (this.observer) this.observer.observe(card.node);
      else card.loadDetail().catch(() => {});
    },

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
        if (deleted.has(item.id)) continue; // deleted while the list was on its way
        remember(item);
        if (!this.oldest || item.created_at < this.oldest) this.oldest = item.created_at;
      }
      for (const item of r.body.results) if (known.has(item.id)) this.add(known.get(item.id));
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
    if (deleted.has(item.id)) return;
    if (item.deleted) {
      // The item's last event: it is gone (deleted in another tab, or by an admin).
      deleted.add(item.id);
      known.delete(item.id);
      const card = cardsById.get(item.id);
      if (card && card.phase !== "removed") { // not the card whose Delete this is
        card.gone();
        announce(`${card.name}: deleted`);
      }
      return;
    }
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
    rows: new Map(), // urlStorageKey -> { row, entry, status }
    expecting: null, // the entry whose "Resume…" opened the file chooser

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
        if (!this.rows.has(entry.urlStorageKey)) this.add(entry, offset);
      }
    },

    nameOf(entry) { return (entry.metadata && entry.metadata.filename) || "A file"; },

    add(entry, offset) {
      const name = this.nameOf(entry);
      const sent = offset != null ? `${formatBytes(offset)} of ${formatBytes(entry.size)} sent` : formatBytes(entry.size);
      const resume = el("button", {
        type: "button", class: "button", text: "Resume…", "aria-label": `Resume the upload of ${name}: pick the file again`,
      });
      const discard = el("button", {
        type: "button", class: "button subtle", text: "Discard", "aria-label": `Discard the unfinished upload of ${name}`,
      });
      const status = el("span", { class: "row-status", role: "status" });
      const row = el("li", { dataset: { key: entry.urlStorageKey } }, [
        el("span", { class: "row-what" }, [el("strong", { text: name }), ` — ${sent}`]),
        status,
        el("span", { class: "row-actions" }, [resume, discard]),
      ]);
      resume.addEventListener("click", () => {
        // The browser cannot reopen the file: the person picks it again, and its fingerprint
        // (name, size, date, type) finds this upload.
        this.expecting = entry;
        status.textContent = `Pick ${name} (${formatBytes(entry.size)}) in the window that opens.`;
        input.click();
      });
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
        queue.poke();
      });
      this.rows.set(entry.urlStorageKey, { row, entry, status });
      this.list.append(row);
      this.box.hidden = false;
    },

    picked(files) {
      // After "Resume…": say plainly whether the file picked is the one that was expected.
      const entry = this.expecting;
      this.expecting = null;
      if (!entry || !this.rows.has(entry.urlStorageKey)) return;
      const name = this.nameOf(entry);
      const same = files.some((f) => f.name === name && f.size === entry.size);
      if (!same) {
        this.rows.get(entry.urlStorageKey).status.textContent = files.length
          ? `That was not ${name} (${formatBytes(entry.size)}), so it was added as a new upload. `
            + `Pick ${name} itself to continue this one.`
          : "";
      }
    },

    resumed(key, name) {
      // A file picked again found its earlier upload: the card below goes on from there.
      if (!this.rows.has(key)) return;
      this.forget(key);
      announce(`${name}: continuing the unfinished upload`);
    },

    forget(key) {
      const found = this.rows.get(key);
      if (found) found.row.remove();
      this.rows.delete(key);
      this.box.hidden = this.rows.size === 0;
    },
  };

  // --- adding files ----------------------------------------------------------------------------

  function addFiles(files) {
    const list = Array.from(files || []);
    for (const file of list) {
      const card = new Card({ name: file.name, size: file.size, session: true, file });
      uploadsList.append(card.node); // in line, in the order given
      const refusal = clientRefusal(file);
      if (refusal) {
        card.refuse(refusal);
        announce(`${file.name} was not sent: ${refusal}`);
      } else {
        check(card, file);
      }
    }
    unfinished.picked(list);
    if (list.length > 1) announce(`${list.length} files added`);
    library.updateEmpty();
  }

  // --- checked and cut in the browser (ffmpeg.wasm in Web Workers: wasm-pool.js) ----------------
  // Each picked file is probed before a byte is sent: not media is refused here with the server's
  // own sentence, and nothing is created on the server; what the probe found fills the card. With
  // "Edit before upload", a video waits for a start and an end and only the cut part is sent.

  const wasm = window.cpcWasm && window.cpcWasm.supported ? window.cpcWasm : null;
  const editFirst = document.getElementById("edit-first");
  if (!wasm) {
    editFirst.disabled = true;
    document.getElementById("edit-hint").textContent = "This browser cannot run ffmpeg in the page (no "
      + "WebAssembly or Web Workers): files are checked by the server when they arrive, and cannot be cut here.";
  }

  async function check(card, file) {
    if (!wasm) { queue.add(card); return; }
    queue.cards.push(card); // keeps its place in line while it is read
    card.phase = "checking";
    card.setState("checking");
    card.setBadge("Checking", "busy");
    card.setCancelLabel("Remove");
    card.note("Reading the file in your browser…");
    let checked;
    try {
      checked = await wasm.check(file);
    } catch (err) {
      // ffmpeg.wasm did not start or gave up: the server checks the file, as without it.
      if (card.phase !== "checking") return;
      card.note("Not checked in the browser (ffmpeg.wasm failed); the server checks it.");
      card.enqueue();
      return;
    }
    if (card.phase !== "checking") return; // removed while it was read
    card.note("");
    if (checked.refused) {
      card.file = null;
      queue.cards.splice(queue.cards.indexOf(card), 1);
      queue.update();
      card.refuse(checked.refused);
      announce(`${card.name} was not sent: ${checked.refused}`);
      return;
    }
    const info = checked.info;
    card.probed = info.label; // "" when ffmpeg.wasm could not read it: the server will say
    if (!info.media) card.note("Your browser could not read this file; the server checks it.");
    card.setMeta();
    if (editFirst.checked && info.kind === "video" && info.duration) editCut(card, file, info);
    else card.enqueue();
  }

  function editCut(card, file, info) {
    card.phase = "editing";
    card.setState("editing");
    card.setBadge("Waiting for you", "wait");
    const field = (label, id, value) => el("label", { class: "cut-field", for: id }, [
      el("span", { text: label }),
      el("input", { id, type: "number", min: "0", max: String(info.duration), step: "0.1", value, required: true }),
    ]);
    const startId = `cut-start-${card.n}`;
    const endId = `cut-end-${card.n}`;
    const button = el("button", { type: "submit", class: "button primary", text: "Upload" });
    button.setAttribute("aria-label", `Upload the cut of ${card.name}`);
    const form = el("form", { class: "cut", "aria-label": `Cut ${card.name}` }, [
      field("Start (s)", startId, "0"),
      field("End (s)", endId, String(Math.floor(info.duration * 10) / 10)),
      button,
      el("p", { class: "hint", text: `The file is ${Math.round(info.duration * 10) / 10} s long. The cut starts at the key frame at or before Start.` }),
    ]);
    card.q("[data-error]").before(form);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const start = Number(form.querySelector(`#${startId}`).value);
      const end = Number(form.querySelector(`#${endId}`).value);
      if (!(start >= 0 && end > start && end <= info.duration + 0.05)) {
        card.error(`Start and End must be between 0 and ${Math.round(info.duration * 10) / 10} s, with End after Start.`);
        return;
      }
      card.error("");
      for (const node of form.elements) node.disabled = true;
      card.setBadge("Cutting", "busy");
      card.note("Cutting in your browser (no re-encoding)…");
      let cut;
      let cutInfo;
      try {
        cut = await wasm.trim(file, start, end);
        cutInfo = await wasm.probe(cut);
      } catch (err) {
        for (const node of form.elements) node.disabled = false;
        card.setBadge("Waiting for you", "wait");
        card.note("");
        card.error(String(err.message || err));
        return;
      }
      if (card.phase !== "editing") return; // removed meanwhile
      form.remove();
      card.note("");
      card.file = cut;
      card.name = cut.name;
      card.size = cut.size;
      card.q("[data-name]").textContent = cut.name;
      card.probed = wasm.describe(cutInfo);
      card.setMeta();
      announce(`${cut.name}: cut, ${formatBytes(cut.size)}, waiting to send`);
      card.enqueue();
    });
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
    `Up to ${formatBytes(limits.max_bytes)} per file, any number of files at once (${MAX_SENDING} are sent at a time). `
    + `Accepted: ${describeAccepted()}. Uploads continue after a reload: add the same file again.`;

  // --- recording from the camera (WHIP) ---------------------------------------------------------
  // The browser's own WebRTC publishes the camera and microphone to /api/whip/ (RFC 9725), with
  // the page's session and CSRF token as every other call here. The server records what arrives
  // into a new item; Stop ends the session, and the item is processed like any upload.

  const recorder = {
    box: document.getElementById("recorder"),
    button: document.getElementById("record"),
    screenButton: document.getElementById("record-screen"),
    panel: document.getElementById("recording"),
    preview: document.getElementById("record-preview"),
    elapsed: document.getElementById("record-elapsed"),
    stopButton: document.getElementById("record-stop"),
    errorBox: document.getElementById("record-error"),
    pc: null,
    stream: null,
    location: null,
    card: null,
    startedAt: 0,
    timer: null,

    supported() {
      return Boolean(window.RTCPeerConnection && navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
    },

    error(text) {
      this.errorBox.hidden = !text;
      this.errorBox.textContent = text || "";
    },

    seconds() { return this.startedAt ? (performance.now() - this.startedAt) / 1000 : 0; },

    tick() {
      const text = formatClock(this.seconds());
      this.elapsed.textContent = text;
      if (this.card) this.card.bar("upload", null, `Recording · ${text}`);
    },

    async open(source) {
      if (source !== "screen") {
        return navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: true });
      }
      const stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: true });
      if (!stream.getAudioTracks().length) {
        // Most screens share no sound: the microphone speaks over it, if it may.
        try {
          const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
          for (const track of mic.getAudioTracks()) stream.addTrack(track);
        } catch (err) { /* a silent screen recording, then */ }
      }
      return stream;
    },

    async start(source = "camera") {
      this.error("");
      this.button.disabled = this.screenButton.disabled = true;
      this.source = source;
      try {
        this.stream = await this.open(source);
      } catch (err) {
        const what = source === "screen" ? "The screen could not be shared" : "The camera could not be opened";
        this.fail(`${what} (${err.name}): allow it, then try again.`);
        return;
      }
      // Ending the share from the browser's own bar is a Stop.
      const video = this.stream.getVideoTracks()[0];
      if (video) video.addEventListener("ended", () => { if (this.startedAt && !this.stopButton.disabled) this.stop(); });
      this.preview.setAttribute("aria-label", source === "screen" ? "Screen preview" : "Camera preview");
      this.preview.srcObject = this.stream;
      this.panel.hidden = false;
      this.elapsed.textContent = "Connecting…";
      const pc = new RTCPeerConnection();
      this.pc = pc;
      for (const track of this.stream.getTracks()) pc.addTransceiver(track, { direction: "sendonly", streams: [this.stream] });
      try {
        await pc.setLocalDescription(await pc.createOffer());
        await gathered(pc, 3000); // WHIP without trickle: the offer carries every candidate
        const r = await fetch(this.box.dataset.whipUrl, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/sdp", "X-CSRFToken": csrfToken },
          body: pc.localDescription.sdp,
        });
        if (r.status !== 201) {
          let message = `The server refused the recording (HTTP ${r.status}).`;
          try { message = (await r.json()).error.message || message; } catch (err) { /* not JSON */ }
          throw new Error(message);
        }
        this.location = r.headers.get("Location");
        await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
      } catch (err) {
        this.fail(err.message || String(err));
        return;
      }
      pc.addEventListener("connectionstatechange", () => {
        if (pc.connectionState === "connected" && !this.startedAt) {
          this.startedAt = performance.now();
          this.stopButton.disabled = false;
          announce("Recording");
        } else if (pc.connectionState === "failed" && this.pc === pc) {
          // The server ends the session itself and keeps what it recorded.
          this.finish("The connection was lost; what was recorded is kept.");
        }
      });
      const itemId = itemIdFromUrl(this.location);
      const card = new Card({ name: source === "screen" ? "Screen recording" : "Camera recording", size: 0, session: true });
      uploadsList.prepend(card.node);
      card.claim(itemId);
      card.recording(source);
      this.card = card;
      library.updateEmpty();
      this.tick();
      this.timer = window.setInterval(() => this.startedAt && this.tick(), 250);
    },

    async stop() {
      this.stopButton.disabled = true;
      const location = this.location;
      const seconds = this.seconds();
      this.elapsed.textContent = `Stopping at ${formatClock(seconds)}…`;
      let message = "";
      try {
        // Answers once the recording is stored and queued for processing.
        const r = await fetch(location, { method: "DELETE", credentials: "same-origin", headers: { "X-CSRFToken": csrfToken } });
        if (!r.ok && r.status !== 404) message = `Stopping failed (HTTP ${r.status}); the server ends the recording by itself.`;
      } catch (err) {
        message = "The server could not be reached; it ends the recording by itself.";
      }
      this.finish(message, seconds);
    },

    finish(message, seconds = this.seconds()) {
      window.clearInterval(this.timer);
      if (this.pc) this.pc.close();
      if (this.stream) for (const track of this.stream.getTracks()) track.stop();
      this.preview.srcObject = null;
      this.pc = this.stream = this.location = null;
      this.panel.hidden = true;
      this.button.disabled = this.screenButton.disabled = false;
      this.error(message);
      if (this.card) this.card.recorded(seconds);
      this.card = null;
      this.startedAt = 0;
    },

    fail(message) {
      if (this.location) {
        fetch(this.location, { method: "DELETE", credentials: "same-origin", headers: { "X-CSRFToken": csrfToken } });
      }
      this.card = null;
      this.finish(message);
      announce(`Recording failed: ${message}`);
    },
  };

  function formatClock(seconds) {
    const s = Math.floor(seconds);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function gathered(pc, timeoutMs) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") { resolve(); return; }
      const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
      pc.addEventListener("icegatheringstatechange", done);
      window.setTimeout(resolve, timeoutMs);
    });
  }

  if (recorder.supported()) {
    recorder.button.addEventListener("click", () => recorder.start("camera"));
    if (navigator.mediaDevices.getDisplayMedia) {
      recorder.screenButton.addEventListener("click", () => recorder.start("screen"));
    } else {
      recorder.screenButton.hidden = true; // phones: no screen to share
    }
    recorder.stopButton.addEventListener("click", () => recorder.stop());
  } else {
    recorder.button.disabled = recorder.screenButton.disabled = true;
    recorder.error("This browser cannot record from a camera (no WebRTC).");
  }

  // --- start -----------------------------------------------------------------------------------

  if (!window.tus || !tus.isSupported) {
    dropzone.append(el("p", { class: "error", text: "This browser cannot upload files in chunks; use a current browser." }));
    document.getElementById("pick").disabled = true;
  } else {
    unfinished.show();
  }
  library.load(`${config.urls.media}?page_size=20`);
  connect();
  // Time left counts down between events (a waiting item hears nothing until the line moves).
  window.setInterval(() => {
    for (const card of cardsById.values()) {
      const item = card.item;
      if (item && item.status === "Processing" && (card.etaFrom != null || item.waiting) && !card.inUpload) {
        card.showProcessing();
      }
    }
  }, 1000);
  document.documentElement.dataset.ready = "true"; // handlers are attached (tests wait for it)
})();
