// mlx-sdxs studio: the page's half of the loop. Frames go out as JPEG over one WebSocket, newest only;
// results come back the same way (1-byte tag: 1 = AI image, 2 = server camera frame); controls and
// status are JSON text messages. The webcam sends continuously; the drawing canvas (draw.js) after each change.
// No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const SEND_EVERY_MS = 33;          // at most ~30 frames a second from the webcam
const MAX_BUFFERED = 256 * 1024;   // a frame is skipped while the socket still holds this much unsent

const SOURCE_NAMES = { browser: "my webcam (this browser)", draw: "draw (a canvas here)" };

const state = { ws: null, stream: null, source: "", sending: false, urls: {}, sentFrames: 0, firstOutput: false,
                noteUntil: 0, sketchpad: null, drawingChanged: false };

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
    state.sketchpad.resize(s.render_size[0], s.render_size[1]);
    for (const frame of document.querySelectorAll(".frame")) frame.style.aspectRatio = `${s.render_size[0]} / ${s.render_size[1]}`;
  }
  if (document.activeElement !== $("prompt") && s.prompt != null) $("prompt").value = s.prompt;
  if (document.activeElement !== $("prompt-b")) $("prompt-b").value = s.prompt_b || "";
  // Sliders show the session's live values (keys and other viewers change them too), unless being dragged.
  for (const [id, value] of [["prompt-blend", s.prompt_blend], ["feedback", s.feedback], ["blend", s.blend],
                             ["ema", s.ema], ["seed-blend", s.seed_blend], ["control-strength", s.control_strength]]) {
    const input = $(id);
    if (value != null && document.activeElement !== input) {
      input.value = value;
      input.nextElementSibling.textContent = Number(value).toFixed(2);
    }
  }
  showNote(s.note);
  $("seed-blend-row").hidden = s.seed_blend == null;
  $("control-row").hidden = $("control-strength-row").hidden = s.control == null;
  if (s.control != null && document.activeElement !== $("control-mode")) $("control-mode").value = s.control;
  const select = $("source");
  if (select.options.length !== s.sources.length) {
    select.innerHTML = "";
    for (const name of s.sources) select.add(new Option(SOURCE_NAMES[name] || name, name));
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
  const browser = name === "browser", draw = name === "draw";
  $("webcam").hidden = !browser;
  $("drawing").hidden = $("draw-tools").hidden = !draw;
  $("camera").hidden = browser || draw;
  $("input-hint").hidden = true;
  if (draw) {
    state.drawingChanged = true;  // the canvas as it is now is the first frame
    startSending();
  } else if (browser) {
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
  }
}

// The frame to send now, as a canvas: the webcam's picture, or the drawing once it changed; else null.
function nextFrame(video, scratch) {
  if (state.source === "draw") {
    if (!state.drawingChanged) return null;
    state.drawingChanged = false;
    return $("drawing");
  }
  if (state.source !== "browser" || video.videoWidth === 0) return null;
  scratch.width = video.videoWidth; scratch.height = video.videoHeight;
  scratch.getContext("2d").drawImage(video, 0, 0);
  return scratch;
}

function startSending() {
  if (state.sending) return;
  state.sending = true;
  const video = $("webcam");
  const scratch = document.createElement("canvas");
  let busy = false;
  setInterval(() => {
    const ws = state.ws;
    if (busy || !ws || ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > MAX_BUFFERED) return;  // newest wins
    const frame = nextFrame(video, scratch);
    if (!frame) return;
    busy = true;
    frame.toBlob((blob) => {
      busy = false;
      if (blob && ws.readyState === WebSocket.OPEN) { ws.send(blob); state.sentFrames += 1; }
    }, "image/jpeg", 0.85);
  }, SEND_EVERY_MS);
}

function setupDrawing() {
  const pad = createSketchpad($("drawing"), () => { state.drawingChanged = true; });
  pad.reset();
  const tool = (name) => {
    pad.setTool(name);
    for (const id of ["pen", "eraser"]) {
      $(id).classList.toggle("active", id === name);
      $(id).setAttribute("aria-pressed", String(id === name));
    }
  };
  $("pen").addEventListener("click", () => tool("pen"));
  $("eraser").addEventListener("click", () => tool("eraser"));
  slider("brush", null, (_, size) => pad.setSize(size));
  $("undo").addEventListener("click", () => pad.undo());
  $("clear").addEventListener("click", () => pad.clear());
  $("upload").addEventListener("change", async () => {
    const file = $("upload").files[0];
    $("upload").value = "";
    if (!file) return;
    try { await pad.upload(file); } catch (error) { showNote(`not an image: ${file.name}`, 5000); }
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z" && state.source === "draw") { e.preventDefault(); pad.undo(); }
  });
  state.sketchpad = pad;
}

function slider(id, key, apply) {
  const input = $(id);
  const digits = Number(input.step) >= 1 ? 0 : 2;
  const show = () => (input.nextElementSibling.textContent = Number(input.value).toFixed(digits));
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
  slider("control-strength", "control_strength", settings);
  $("control-mode").addEventListener("change", () => settings("control", $("control-mode").value));
  $("source").addEventListener("change", () => send({ type: "source", source: $("source").value }));
  $("snapshot").addEventListener("click", snapshot);
  $("record").addEventListener("click", () => send({ type: "record", action: $("record").classList.contains("recording") ? "stop" : "start" }));
  setupDrawing();
  connect();
}

setup();
