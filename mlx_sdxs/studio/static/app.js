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
  if (message.type === "line") return showLine(message);
  if (message.type === "status") { $("line").hidden = true; return showStatus(message); }
  if (message.type === "error") { $("source").value = state.source; return showNote(message.message, 5000); }
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
  state.status = s;  // this page's stream as the server last said (a visitor's own; the host's for the host)
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
  showKnobs(s);
  showNote(s.note);
  if (s.max_streams != null) {  // the host's page: how many visitors stream, and how many wait
    $("streams-row").hidden = false;
    if (document.activeElement !== $("max-streams")) $("max-streams").value = s.max_streams;
    $("streams-in-use").textContent = `${s.visitors_streaming} streaming, ${s.visitors_waiting} waiting`;
  }
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

// The knob table (GET /api/knobs): a slider or a menu for each number or choice knob, shown while the status
// lists it (a ControlNet's knobs only with a ControlNet, the seed blend only with a second seed).
async function loadKnobs() {
  const response = await fetch("/api/knobs");
  for (const knob of await response.json()) {
    if (knob.kind === "text") continue;  // the prompts have their own boxes
    const row = document.createElement("label");
    row.id = `knob-${knob.name}`; row.title = knob.help; row.hidden = true;
    row.append(`${knob.label} `);
    let input;
    if (knob.kind === "choice") {
      input = document.createElement("select");
      for (const choice of knob.choices) input.add(new Option(choice, choice));
      input.addEventListener("change", () => send({ type: "settings", [knob.name]: input.value }));
      row.append(input);
    } else {
      input = Object.assign(document.createElement("input"),
                            { type: "range", min: knob.low, max: knob.high, step: knob.step });
      const shown = document.createElement("output");
      input.addEventListener("input", () => {
        shown.textContent = Number(input.value).toFixed(2);
        send({ type: "settings", [knob.name]: Number(input.value) });
      });
      row.append(input, shown);
    }
    input.setAttribute("aria-label", knob.label);
    input.dataset.knob = knob.name;
    $("knobs").append(row);
  }
}

// Controls show the session's live values (keys, OSC and other viewers change them too), unless in use.
function showKnobs(s) {
  for (const row of $("knobs").children) {
    const name = row.id.slice("knob-".length), input = row.querySelector("[data-knob]");
    row.hidden = !(s.knobs || []).includes(name) || (name === "prompt_blend" && !s.prompt_b);
    if (row.hidden || document.activeElement === input) continue;
    input.value = s[name];
    if (input.type === "range") input.nextElementSibling.textContent = Number(s[name]).toFixed(2);
  }
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

// Every stream is busy: this page waits in line (its own stream comes when one is free), and may watch the host's.
function showLine(message) {
  $("line").hidden = false;
  $("line-text").textContent = message.loading ? "The model is loading: your camera starts in a moment." :
    `Every stream is busy (${message.max_streams} at once): you are number ${message.place} in line, and your ` +
    "camera starts as soon as one is free.";
  $("watch").setAttribute("aria-pressed", String(message.watching));
  $("watch").textContent = message.watching ? "Stop watching the host's stream" : "Watch the host's stream meanwhile";
  if (message.host) {
    $("ai-fps").textContent = message.host.ai_fps.toFixed(2);
    $("display-fps").textContent = message.host.display_fps.toFixed(1);
  }
}

async function snapshot() {
  // A visitor's own stream is on no server route: the page saves the image it shows.
  const response = await fetch(state.role === "host" ? "/snapshot.png" : $("output").src);
  if (!response.ok) return showNote(await response.text(), 5000);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url; link.download = `mlx-sdxs-${new Date().toISOString().replace(/[:.]/g, "-")}.${blob.type === "image/png" ? "png" : "jpg"}`;
  document.body.append(link); link.click(); link.remove();
  const thumb = document.createElement("img");
  thumb.src = url; thumb.alt = "snapshot";
  $("snapshots").prepend(thumb);
}

// The host's page (opened with the host token) has the host-only controls and shows how visitors join.
async function loadRole() {
  const me = await (await fetch("/api/whoami")).json();
  state.role = me.role;
  $("record").hidden = me.role !== "host";
  if (me.role !== "host") return;
  $("qr").src = "/qr.svg";
  $("visitor-url").href = me.visitor_url;
  $("visitor-url").textContent = me.visitor_url;
  $("invite").hidden = false;
}

function setup() {
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") send({ type: "prompt", prompt: $("prompt").value }); });
  $("prompt-b").addEventListener("keydown", (e) => {
    if (e.key === "Enter") send({ type: "prompt", prompt_b: $("prompt-b").value });
  });
  $("source").addEventListener("change", () => send({ type: "source", source: $("source").value }));
  $("snapshot").addEventListener("click", snapshot);
  $("max-streams").addEventListener("change", () => send({ type: "max_streams", value: Number($("max-streams").value) }));
  $("watch").addEventListener("click", () => send({ type: "watch", watch: $("watch").getAttribute("aria-pressed") !== "true" }));
  $("record").addEventListener("click", () => send({ type: "record", action: $("record").classList.contains("recording") ? "stop" : "start" }));
  setupDrawing();
  loadRole();
  loadKnobs().then(connect);
}

setup();
