// The playground: fills the voice list from /v1/voices, sends /v1/tts, plays a msgpack stream with the
// Web Audio API as its chunks arrive, then puts the whole result (a WAV blob) into the <audio> element.
// "Your voice" clones a voice: an uploaded file, or a recording made here (MediaRecorder, sent as WAV),
// goes to POST /v1/voices; the new voice joins the picker under "Your voices" and is selected.
// It holds no secret: an API key, when the server needs one, is typed in by the user and sent as a
// bearer token. Everything it loads comes from this server (no CDN, no build step).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const API = new URL("../", document.baseURI); // the app's root, whatever prefix it is served under
  const STAGES = ["semantic", "coarse", "fine", "codec"];
  const state = { key: "", audioCtx: null, busy: false, voiceBusy: false, objectUrl: null };
  // What the last request did, for people reading the page and for tests.
  // voice: what the last add / delete of a voice did ({added}, {deleted} or {error}).
  window.playground = { last: null, voicesLoaded: false, voice: null };
  const MAX_RECORD_S = 12; // Bark's prompts hold about 13 s: a recording stops itself before that

  function headers(extra) {
    const h = { ...extra };
    if (state.key) h.Authorization = `Bearer ${state.key}`;
    return h;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function setState(text) { $("state").textContent = text; }

  // The API's error message from a non-2xx answer ({"error": {"message", ...}}), else the status line.
  async function apiError(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return `HTTP ${resp.status} ${resp.statusText}`;
  }

  // pick: the voice to select once the list is in (a voice just added), else the current choice is kept.
  async function loadVoices(pick) {
    let resp;
    try {
      resp = await fetch(new URL("v1/voices", API), { headers: headers() });
    } catch (e) {
      showError(`cannot reach the server: ${e.message}`);
      return;
    }
    if (resp.status === 401) {
      $("key-row").hidden = false;
      showError(await apiError(resp));
      return;
    }
    if (!resp.ok) { showError(await apiError(resp)); return; }
    const data = await resp.json();
    // a server that clones voices lists the caller's own ("custom"); without that the section stays hidden
    const cloning = Array.isArray(data.custom);
    const custom = cloning ? [...data.custom].sort((a, b) => a.name.localeCompare(b.name)) : [];
    fillVoices(data.voices || [], data.aliases || {}, custom, pick);
    fillMyVoices(custom);
    $("clone").hidden = !cloning;
    $("voice-record").hidden = !canRecord();
    showError("");
    window.playground.voicesLoaded = true;
  }

  const seconds = (x) => (typeof x === "number" ? `${x.toFixed(1)} s` : "");

  function fillVoices(presets, aliases, custom, pick) {
    const select = $("voice");
    const keep = pick === undefined ? select.value : pick;
    select.querySelectorAll("optgroup").forEach((g) => g.remove());
    const group = (label, entries) => {
      const g = document.createElement("optgroup");
      g.label = label;
      for (const [value, text] of entries) g.append(new Option(text, value));
      select.append(g);
    };
    if (custom.length) {
      group("Your voices", custom.map((v) => [v.name, v.duration_s == null ? v.name : `${v.name} (${seconds(v.duration_s)})`]));
    }
    group("aliases", Object.entries(aliases).sort().map(([a, p]) => [a, `${a} (${p})`]));
    group("presets", [...presets].sort().map((p) => [p, p]));
    select.value = keep;
    if (select.value !== keep) select.value = ""; // gone (deleted, or another key's): Bark picks
  }

  // The caller's voices, each with a delete button.
  function fillMyVoices(custom) {
    const list = $("my-voices");
    list.replaceChildren();
    for (const v of custom) {
      const item = document.createElement("li");
      item.dataset.voiceId = v.id;
      item.dataset.voiceName = v.name;
      const name = document.createElement("span");
      name.textContent = v.name;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = seconds(v.duration_s);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "\u00d7";
      remove.title = `delete the voice ${v.name}`;
      remove.setAttribute("aria-label", remove.title);
      remove.addEventListener("click", () => deleteVoice(v));
      item.append(name, meta, remove);
      list.append(item);
    }
  }

  function requestBody() {
    const body = { text: $("text").value };
    if ($("voice").value) body.voice = $("voice").value;
    if ($("seed").value !== "") body.seed = Number($("seed").value);
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    if ($("max-tokens").value !== "") body.max_semantic_tokens = Number($("max-tokens").value);
    return body;
  }

  // --- audio ----------------------------------------------------------------------------------
  function pcm16ToFloat(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Float32Array(bytes.byteLength >> 1);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }

  function wavBlob(pieces, sampleRate) {
    const dataBytes = pieces.reduce((n, p) => n + p.byteLength, 0);
    const header = new DataView(new ArrayBuffer(44));
    const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
    text(0, "RIFF"); header.setUint32(4, 36 + dataBytes, true); text(8, "WAVE");
    text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
    header.setUint16(32, 2, true); header.setUint16(34, 16, true);
    text(36, "data"); header.setUint32(40, dataBytes, true);
    return new Blob([header.buffer, ...pieces], { type: "audio/wav" });
  }

  // Plays chunks back to back: each one starts where the previous one ends (or now, if that is past).
  class ChunkPlayer {
    constructor(ctx) { this.ctx = ctx; this.next = 0; this.scheduled = 0; }
    play(samples, sampleRate) {
      if (!samples.length) return;
      const buffer = this.ctx.createBuffer(1, samples.length, sampleRate);
      buffer.copyToChannel(samples, 0);
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.ctx.destination);
      const at = Math.max(this.ctx.currentTime + 0.05, this.next);
      source.start(at);
      this.next = at + buffer.duration;
      this.scheduled += 1;
    }
  }

  function audioContext() {
    if (!state.audioCtx) state.audioCtx = new AudioContext();
    if (state.audioCtx.state === "suspended") state.audioCtx.resume();
    return state.audioCtx;
  }

  function showAudio(blob) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(blob);
    $("audio").src = state.objectUrl;
    const link = $("download");
    link.href = state.objectUrl;
    link.download = `bark.${blob.type.split("/")[1] || "audio"}`;
    link.hidden = false;
  }

  // --- timings --------------------------------------------------------------------------------
  function addStageTimings(sums, chunkTimings) {
    for (const [stage, t] of Object.entries(chunkTimings || {})) {
      const s = sums[stage] || (sums[stage] = { queue_s: 0, work_s: 0 });
      s.queue_s += t.started - t.queued_at;
      s.work_s += t.finished - t.started;
    }
  }

  function showTimings(r) {
    const sec = (x) => (x == null ? "" : `${x.toFixed(3)} s`);
    $("ttfa").textContent = sec(r.ttfa_s);
    $("total").textContent = sec(r.total_s);
    $("duration").textContent = sec(r.duration_s);
    $("segments").textContent = r.segments == null ? "" : String(r.segments);
    $("seed-out").textContent = r.seed == null ? "" : String(r.seed);
    const rows = $("stages");
    rows.replaceChildren();
    const order = [...STAGES, ...Object.keys(r.stages).filter((s) => !STAGES.includes(s))];
    for (const stage of order.filter((s) => r.stages[s])) {
      const row = rows.insertRow();
      row.dataset.stage = stage;
      for (const text of [stage, sec(r.stages[stage].queue_s), sec(r.stages[stage].work_s)]) {
        row.insertCell().textContent = text;
      }
    }
    $("timings").hidden = false;
  }

  // --- requests -------------------------------------------------------------------------------
  async function post(body, accept) {
    return fetch(new URL("v1/tts", API), {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: accept }),
      body: JSON.stringify(body),
    });
  }

  async function generateStream(body, t0) {
    const resp = await post({ ...body, stream: true, format: "pcm" }, "application/msgpack");
    if (!resp.ok) throw new Error(await apiError(resp));
    const player = new ChunkPlayer(audioContext());
    const decoder = new MsgpackStream.Decoder();
    const reader = resp.body.getReader();
    const r = { stream: true, stages: {}, pieces: [], sampleRate: 24000, chunkTimesMs: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const obj of decoder.push(value)) {
        if (obj.error) throw new Error(obj.error.message);
        if (obj.done) { Object.assign(r, { seed: obj.seed, requestId: obj.request_id, doneMs: performance.now() }); continue; }
        const samples = pcm16ToFloat(obj.audio);
        if (r.ttfa_s == null) { r.ttfa_s = (performance.now() - t0) / 1000; showTimings({ ...r, stages: {} }); }
        r.sampleRate = obj.sample_rate;
        r.segments = obj.n_segments;
        r.pieces.push(obj.audio);
        r.chunkTimesMs.push(performance.now());
        player.play(samples, obj.sample_rate);
        addStageTimings(r.stages, obj.timings);
        setState(`playing: segment ${obj.index + 1} of ${obj.n_segments} arrived`);
      }
    }
    if (r.doneMs == null) throw new Error("the stream ended early (no closing message)");
    r.scheduled = player.scheduled;
    const samples = r.pieces.reduce((n, p) => n + (p.byteLength >> 1), 0);
    r.duration_s = samples / r.sampleRate;
    showAudio(wavBlob(r.pieces, r.sampleRate));
    delete r.pieces;
    return r;
  }

  async function generateFile(body, fmt, t0) {
    const resp = await post({ ...body, format: fmt }, "application/json");
    if (!resp.ok) throw new Error(await apiError(resp));
    const out = await resp.json();
    const bytes = Uint8Array.from(atob(out.audio_base64), (c) => c.charCodeAt(0));
    const types = { wav: "audio/wav", flac: "audio/flac", mp3: "audio/mpeg", opus: "audio/ogg" };
    showAudio(new Blob([bytes], { type: types[fmt] || "application/octet-stream" }));
    return { stream: false, ttfa_s: (performance.now() - t0) / 1000, stages: out.timings.stages,
             duration_s: out.duration_s, segments: out.segments, seed: out.seed, requestId: out.request_id };
  }

  async function generate(event) {
    event.preventDefault();
    if (state.busy) return;
    state.busy = true;
    $("generate").disabled = true;
    showError("");
    setState("generating…");
    const fmt = $("format").value;
    const t0 = performance.now();
    try {
      if (fmt === "stream") audioContext(); // inside the click: browsers allow audio to start from a gesture
      const r = fmt === "stream" ? await generateStream(requestBody(), t0) : await generateFile(requestBody(), fmt, t0);
      r.total_s = (performance.now() - t0) / 1000;
      window.playground.last = r;
      showTimings(r);
      setState("done");
    } catch (e) {
      window.playground.last = { error: e.message };
      showError(e.message);
      setState("failed");
    } finally {
      state.busy = false;
      $("generate").disabled = false;
    }
  }

  // --- your voice ---------------------------------------------------------------------------
  const rec = { recorder: null, timer: null, started: 0 };

  function canRecord() {
    return typeof window.MediaRecorder === "function" && !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
  }

  function setVoiceState(text) { $("voice-state").textContent = text; }

  function voiceBusy(busy) {
    state.voiceBusy = busy;
    $("voice-add").disabled = busy || !!rec.recorder;
    $("voice-record").disabled = busy;
    $("my-voices").querySelectorAll("button").forEach((b) => { b.disabled = busy; });
  }

  function voiceFailed(message) {
    window.playground.voice = { error: message };
    showError(message);
    setVoiceState("failed");
  }

  function voiceName() {
    const name = $("voice-name").value.trim();
    if (!name) {
      voiceFailed("Give the voice a name first (1 to 64 letters, digits, _ - . or inner spaces).");
      $("voice-name").focus();
    }
    return name;
  }

  // Sends one recording to POST /v1/voices; on success the list is reloaded with the new voice selected.
  async function uploadVoice(blob, filename, name) {
    voiceBusy(true);
    showError("");
    setVoiceState(`adding ${name}…`);
    try {
      const form = new FormData();
      form.append("name", name);
      form.append("file", blob, filename);
      let resp;
      try {
        resp = await fetch(new URL("v1/voices", API), { method: "POST", headers: headers(), body: form });
      } catch (e) {
        voiceFailed(`cannot reach the server: ${e.message}`);
        return;
      }
      if (!resp.ok) { voiceFailed(await apiError(resp)); return; }
      const voice = await resp.json();
      $("voice-file").value = "";
      $("voice-name").value = "";
      await loadVoices(voice.name);
      window.playground.voice = { added: voice };
      setVoiceState(`added ${voice.name}${voice.duration_s == null ? "" : ` (${seconds(voice.duration_s)})`}: selected above`);
    } finally {
      voiceBusy(false);
    }
  }

  function addVoice() {
    if (state.voiceBusy || rec.recorder) return;
    window.playground.voice = null;
    const file = $("voice-file").files[0];
    if (!file) { voiceFailed("Choose a recording to upload first (or press Record)."); return; }
    const name = voiceName();
    if (name) uploadVoice(file, file.name || "recording", name);
  }

  async function deleteVoice(voice) {
    if (state.voiceBusy) return;
    window.playground.voice = null;
    voiceBusy(true);
    showError("");
    setVoiceState(`deleting ${voice.name}…`);
    try {
      const url = new URL(`v1/voices/${encodeURIComponent(voice.id)}`, API);
      let resp;
      try {
        resp = await fetch(url, { method: "DELETE", headers: headers() });
      } catch (e) {
        voiceFailed(`cannot reach the server: ${e.message}`);
        return;
      }
      if (!resp.ok) { voiceFailed(await apiError(resp)); return; }
      await loadVoices();
      window.playground.voice = { deleted: voice.id };
      setVoiceState(`deleted ${voice.name}`);
    } finally {
      voiceBusy(false);
    }
  }

  // A recording as 16-bit mono WAV at 24 kHz (EnCodec's rate), which every server reads, whatever
  // container the browser's MediaRecorder makes (webm/opus in Chromium, ogg in Firefox, mp4 in Safari).
  async function recordingToWav(blob) {
    const rate = 24000;
    const decoded = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await blob.arrayBuffer());
    const n = decoded.length;
    const channels = decoded.numberOfChannels;
    const pcm = new DataView(new ArrayBuffer(2 * n));
    const data = [...Array(channels).keys()].map((c) => decoded.getChannelData(c));
    for (let i = 0; i < n; i++) {
      let x = 0;
      for (const d of data) x += d[i];
      pcm.setInt16(2 * i, Math.max(-32768, Math.min(32767, Math.round((x / channels) * 32767))), true);
    }
    return wavBlob([pcm.buffer], rate);
  }

  function stopRecording() {
    if (rec.recorder && rec.recorder.state !== "inactive") rec.recorder.stop();
  }

  async function toggleRecording() {
    if (rec.recorder) { stopRecording(); return; }
    if (state.voiceBusy) return;
    window.playground.voice = null;
    const name = voiceName();
    if (!name) return;
    showError("");
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      voiceFailed(`cannot record from the microphone: ${e.message}`);
      return;
    }
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.addEventListener("dataavailable", (e) => { if (e.data && e.data.size) chunks.push(e.data); });
    recorder.addEventListener("stop", async () => {
      clearInterval(rec.timer);
      rec.recorder = null;
      stream.getTracks().forEach((t) => t.stop());
      const button = $("voice-record");
      button.textContent = "Record";
      button.classList.remove("recording");
      voiceBusy(true);
      setVoiceState("reading the recording…");
      const raw = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
      let wav;
      try {
        wav = await recordingToWav(raw);
      } catch (e) {
        voiceFailed(`cannot read the recording: ${e.message || e}`);
        voiceBusy(false);
        return;
      }
      await uploadVoice(wav, "recording.wav", name);
    });
    recorder.start(250);
    rec.recorder = recorder;
    rec.started = performance.now();
    const button = $("voice-record");
    button.textContent = "Stop";
    button.classList.add("recording");
    voiceBusy(false); // Add is off while recording; Record (now Stop) stays on
    const tick = () => {
      const s = (performance.now() - rec.started) / 1000;
      setVoiceState(`recording ${name}: ${s.toFixed(1)} s (stops by itself at ${MAX_RECORD_S} s)`);
      if (s >= MAX_RECORD_S) stopRecording();
    };
    tick();
    rec.timer = setInterval(tick, 100);
  }

  $("voice-add").addEventListener("click", addVoice);
  $("voice-record").addEventListener("click", toggleRecording);
  $("voice-name").addEventListener("keydown", (e) => { // Enter here adds the voice rather than generating
    if (e.key === "Enter") { e.preventDefault(); addVoice(); }
  });

  $("form").addEventListener("submit", generate);
  $("key-apply").addEventListener("click", () => { state.key = $("api-key").value.trim(); loadVoices(); });
  $("api-key").addEventListener("change", () => { state.key = $("api-key").value.trim(); });
  loadVoices();
})();
