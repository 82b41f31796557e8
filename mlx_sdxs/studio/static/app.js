// mlx-sdxs studio: the page's half of the loop. Frames go out as JPEG over one WebSocket, newest only;
// results come back the same way (1-byte tag: 1 = AI image, 2 = server camera frame); controls and
// status are JSON text messages. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const SEND_EVERY_MS = 33;          // at most ~30 frames a second from the webcam
const MAX_BUFFERED = 256 * 1024;   // a frame is skipped while the socket still holds this much unsent

const state = { ws: null, stream: null, source: "", sending: false, urls: {}, sentFrames: 0, firstOutput: false,
                noteUntil: 0 };

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("connection").textContent = "live"; $("connection").classList.add("live"); };
  ws.onclose = () => {
    $("connection").textContent = "disconnected — reload to reconnect";
    $("connection").classList.remove("live");
  };
  ws.onmessage = (event) => (typeof event.data === "string" ? onText(JSON.parse(event.data)) : onFrame(event.data));
  state.ws = ws;
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function onFrame(buffer) {
  const tag = new Uint8Array(buffer, 0, 1)[0];
  const target = tag === 1 ? $("output") : $("camera");
  const url = URL.createObjectURL(new Blob([buffer.slice(1)], { type: "image/jpeg" }));
  if (state.urls[tag]) URL.revokeObjectURL(state.urls[tag]);
  state.urls[tag] = url;
  target.src = url;
  if (tag === 1 && !state.firstOutput) { state.firstOutput = true; $("output-hint").hidden = true; }
}

function onText(message) {
  if (message.type === "status") return showStatus(message);
  if (message.type === "error") return showNote(message.message, 5000);
  if (message.type === "recording") {
    if (message.url) {
      $("recording-link").innerHTML = "";
      const link = document.createElement("a");
      link.href = message.url; link.textContent = `recording: ${message.finished}`; link.target = "_blank";
      const video = document.createElement("video");
      video.src = message.url; video.controls = true; video.width = 256;
      $("recording-link").append(link, video);
    }
  }
}

function showNote(text, holdMs = 0) {
  if (!holdMs && Date.now() < state.noteUntil) return;  // an error stays readable for a while
  state.noteUntil = Date.now() + holdMs;
  $("note").hidden = !text;
  $("note").textContent = text || "";
}

let presetsShown = false;
function showStatus(s) {
  $("ai-fps").textContent = s.ai_fps.toFixed(2);
  $("display-fps").textContent = s.display_fps.toFixed(1);
  $("latency").textContent = Math.round(s.latency_ms);
  const stages = Object.entries(s.stage_ms || {}).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(" · ");
  $("stages").textContent = stages ? `${stages} ms` : "–";
  $("received").textContent = state.sentFrames;
  $("dropped").textContent = Object.values(s.dropped_messages || {}).reduce((a, b) => a + b, 0);
  $("backend").textContent = s.backend;
  $("random-banner").hidden = !s.label;
  if (s.render_size && s.render_size.length) {
    $("render-size").textContent = `${s.render_size[0]}×${s.render_size[1]}`;
    for (const frame of document.querySelectorAll(".frame")) frame.style.aspectRatio = `${s.render_size[0]} / ${s.render_size[1]}`;
  }
  if (document.activeElement !== $("prompt") && s.prompt != null) $("prompt").value = s.prompt;
  if (document.activeElement !== $("prompt-b")) $("prompt-b").value = s.prompt_b || "";
  // Sliders show the session's live values (keys and other viewers change them too), unless being dragged.
  for (const [id, value] of [["prompt-blend", s.prompt_blend], ["feedback", s.feedback], ["blend", s.blend],
                             ["ema", s.ema], ["seed-blend", s.seed_blend]]) {
    const input = $(id);
    if (value != null && document.activeElement !== input) {
      input.value = value;
      input.nextElementSibling.textContent = Number(value).toFixed(2);
    }
  }
  showNote(s.note);
  $("seed-blend-row").hidden = s.seed_blend == null;
  const select = $("source");
  if (select.options.length !== s.sources.length) {
    select.innerHTML = "";
    for (const name of s.sources) select.add(new Option(name === "browser" ? "my webcam (this browser)" : name, name));
  }
  if (state.source !== s.source) { select.value = s.source; useSource(s.source); }
  if (!presetsShown && s.gallery) {
    presetsShown = true;
    for (const preset of s.gallery) {
      const button = document.createElement("button");
      button.type = "button"; button.textContent = preset.split(",")[0]; button.title = preset;
      button.onclick = () => { $("prompt").value = preset; send({ type: "prompt", prompt: preset }); };
      $("gallery-presets").append(button);
    }
  }
  $("record").textContent = s.recording ? "Stop recording" : "Start recording";
  $("record").classList.toggle("recording", s.recording);
}

async function useSource(name) {
  state.source = name;
  const browser = name === "browser";
  $("webcam").hidden = !browser;
  $("camera").hidden = browser;
  if (browser) {
    $("input-hint").textContent = "allow the camera to start";
    $("input-hint").hidden = false;
    try {
      state.stream = state.stream || await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
      $("webcam").srcObject = state.stream;
      $("input-hint").hidden = true;
      startSending();
    } catch (error) {
      $("input-hint").textContent = `no webcam: ${error.message}`;
    }
  } else {
    $("input-hint").hidden = true;
  }
}

function startSending() {
  if (state.sending) return;
  state.sending = true;
  const video = $("webcam");
  const canvas = document.createElement("canvas");
  const context = canvas.getContext("2d");
  let busy = false;
  setInterval(() => {
    const ws = state.ws;
    if (state.source !== "browser" || busy || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (ws.bufferedAmount > MAX_BUFFERED || video.videoWidth === 0) return;  // newest wins: skip, never queue
    canvas.width = video.videoWidth; canvas.height = video.videoHeight;
    context.drawImage(video, 0, 0);
    busy = true;
    canvas.toBlob((blob) => {
      busy = false;
      if (blob && ws.readyState === WebSocket.OPEN) { ws.send(blob); state.sentFrames += 1; }
    }, "image/jpeg", 0.8);
  }, SEND_EVERY_MS);
}

function slider(id, key, apply) {
  const input = $(id);
  const show = () => (input.nextElementSibling.textContent = Number(input.value).toFixed(2));
  input.addEventListener("input", () => { show(); apply(key, Number(input.value)); });
  show();
}

async function snapshot() {
  const response = await fetch("/snapshot.png");
  if (!response.ok) return showNote(await response.text(), 5000);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url; link.download = `mlx-sdxs-${new Date().toISOString().replace(/[:.]/g, "-")}.png`;
  document.body.append(link); link.click(); link.remove();
  const thumb = document.createElement("img");
  thumb.src = url; thumb.alt = "snapshot";
  $("snapshots").prepend(thumb);
}

function setup() {
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") send({ type: "prompt", prompt: $("prompt").value }); });
  $("prompt-b").addEventListener("keydown", (e) => {
    if (e.key === "Enter") send({ type: "prompt", prompt_b: $("prompt-b").value, prompt_blend: Number($("prompt-blend").value) });
  });
  const settings = (key, value) => send({ type: "settings", [key]: value });
  slider("prompt-blend", "prompt_blend", settings);
  slider("feedback", "feedback", settings);
  slider("blend", "blend", settings);
  slider("ema", "ema", settings);
  slider("seed-blend", "seed_blend", settings);
  $("source").addEventListener("change", () => send({ type: "source", source: $("source").value }));
  $("snapshot").addEventListener("click", snapshot);
  $("record").addEventListener("click", () => send({ type: "record", action: $("record").classList.contains("recording") ? "stop" : "start" }));
  connect();
}

setup();
