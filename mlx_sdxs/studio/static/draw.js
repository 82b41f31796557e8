// mlx-sdxs studio: the drawing canvas, a source like the webcam. Dark strokes on white paper, as the SDXS
// sketch demo draws them (the server inverts them for the Sketch ControlNet). Pen, eraser, brush size, undo,
// clear, and an uploaded sketch fitted onto the paper; `onChange` runs after every change.
"use strict";

const PAPER = "#ffffff";
const INK = "#000000";
const MAX_UNDO = 30;

function createSketchpad(canvas, onChange) {
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const pad = { tool: "pen", size: 6, undo: [], drawing: false, last: null };

  function fill() { context.fillStyle = PAPER; context.fillRect(0, 0, canvas.width, canvas.height); }
  function remember() {
    pad.undo.push(context.getImageData(0, 0, canvas.width, canvas.height));
    if (pad.undo.length > MAX_UNDO) pad.undo.shift();
  }
  function point(event) {  // page pixels → canvas pixels (the canvas is shown scaled)
    const box = canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) * canvas.width / box.width,
             y: (event.clientY - box.top) * canvas.height / box.height };
  }
  function brush() {  // the size is in canvas pixels at 512 wide, so a stroke looks the same at every render size
    return pad.size * canvas.width / 512 * (pad.tool === "eraser" ? 3 : 1);
  }
  function segment(from, to) {
    context.strokeStyle = pad.tool === "eraser" ? PAPER : INK;
    context.lineWidth = brush();
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    canvas.setPointerCapture(event.pointerId);
    remember();
    pad.drawing = true;
    pad.last = point(event);
    segment(pad.last, pad.last);  // a click is a dot
    onChange();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!pad.drawing) return;
    const next = point(event);
    segment(pad.last, next);
    pad.last = next;
    onChange();
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { pad.drawing = false; });

  return {
    resize(width, height) {  // the render size: keep what is drawn, scaled onto the new paper
      if (canvas.width === width && canvas.height === height) return;
      const old = document.createElement("canvas");
      old.width = canvas.width; old.height = canvas.height;
      old.getContext("2d").drawImage(canvas, 0, 0);
      canvas.width = width; canvas.height = height;
      fill();
      context.drawImage(old, 0, 0, width, height);
      pad.undo = [];
      onChange();
    },
    setTool(tool) { pad.tool = tool; },
    setSize(size) { pad.size = size; },
    undo() {
      const previous = pad.undo.pop();
      if (previous) { context.putImageData(previous, 0, 0); onChange(); }
    },
    clear() { remember(); fill(); onChange(); },
    async upload(file) {  // fitted (contain) onto white paper; transparency becomes paper
      const image = await createImageBitmap(file);
      const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
      const width = image.width * scale, height = image.height * scale;
      remember();
      fill();
      context.drawImage(image, (canvas.width - width) / 2, (canvas.height - height) / 2, width, height);
      onChange();
    },
    reset() { fill(); },
  };
}
