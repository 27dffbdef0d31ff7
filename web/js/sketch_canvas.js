// Atelier Sketch Canvas: a drawing canvas inside the AtelierSketchCanvas node.
// The drawing is mirrored as JSON into the node's "sketch" STRING widget (saved in the workflow, sent
// with the prompt); Python validates it and draws the strokes again at the node's width x height.
// JSON: {"version": 1, "width", "height", "strokes": [{"mode": "draw"|"erase", "size", "points": [[x, y], ...]}],
//        "background": "" | data URL (a guide shown under the strokes; not part of the sketch)}
// The white area on screen is exactly the drawing (width x height, outlined): a stroke starts only inside
// it, and a stroke that leaves it is clamped to its edge, so no point lies outside the drawing.
import { app } from "../../scripts/app.js";

const NODE = "AtelierSketchCanvas";
const MAX_BG = 512;

function parseState(text, w, h) {
  try {
    const s = JSON.parse(text || "");
    if (s && Array.isArray(s.strokes)) return { version: 1, width: s.width || w, height: s.height || h,
                                               strokes: s.strokes, background: s.background || "" };
  } catch (e) { /* empty or hand-edited: start fresh */ }
  return { version: 1, width: w, height: h, strokes: [], background: "" };
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function setupCanvas(node) {
  const data = widget(node, "sketch");
  if (!data || node.atelierSketch) return;
  // The JSON stays a real widget (serialised, validated in Python) but is not shown.
  if (data.element) data.element.style.display = "none";
  data.computeSize = () => [0, -4];
  data.hidden = true;

  const wW = widget(node, "width"), wH = widget(node, "height");
  const size = () => [wW?.value || 512, wH?.value || 512];
  let state = parseState(data.value, ...size());
  const undo = [];
  let mode = "draw", brush = 8, current = null, bgImage = null;

  const root = document.createElement("div");
  root.className = "atelier-sketch";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:4px;flex-wrap:wrap;align-items:center;font-size:12px;";
  // The canvas element is sized to the drawing's aspect ratio inside this area (fit), so its white box and
  // outline are the drawing's bounds; the area around it is the node's own background.
  const area = document.createElement("div");
  area.style.cssText = "flex:1 1 auto;min-height:0;display:flex;align-items:center;justify-content:center;" +
                       "overflow:hidden;";
  const canvas = document.createElement("canvas");
  canvas.className = "atelier-sketch-canvas";
  canvas.style.cssText = "display:block;background:#fff;touch-action:none;cursor:crosshair;" +
                         "outline:1px solid #888;";
  area.append(canvas);
  root.append(bar, area);
  const ctx = canvas.getContext("2d");

  function fit() {
    const [w, h] = size();
    const aw = area.clientWidth, ah = area.clientHeight;
    if (!(aw > 0 && ah > 0)) return;
    const s = Math.min(aw / w, ah / h);
    canvas.style.width = `${Math.floor(w * s)}px`;
    canvas.style.height = `${Math.floor(h * s)}px`;
  }
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(fit).observe(area);

  function button(label, title, fn) {
    const b = document.createElement("button");
    b.textContent = label; b.title = title; b.dataset.action = label.toLowerCase();
    b.style.cssText = "padding:1px 6px;font-size:12px;";
    b.addEventListener("click", (e) => { e.preventDefault(); e.stopPropagation(); fn(); });
    bar.append(b);
    return b;
  }
  const drawBtn = button("Draw", "Draw strokes", () => setMode("draw"));
  const eraseBtn = button("Erase", "Erase strokes", () => setMode("erase"));
  button("Undo", "Undo the last stroke (Ctrl+Z)", () => { if (state.strokes.length) { undo.push(state.strokes.pop()); commit(); } });
  button("Clear", "Clear all strokes", () => { if (state.strokes.length) { state.strokes = []; commit(); } });
  const sizeIn = document.createElement("input");
  sizeIn.type = "range"; sizeIn.min = "1"; sizeIn.max = "64"; sizeIn.value = String(brush);
  sizeIn.title = "Brush size (pixels of the canvas)"; sizeIn.style.width = "70px";
  sizeIn.addEventListener("input", () => { brush = Number(sizeIn.value); });
  bar.append(sizeIn);
  const file = document.createElement("input");
  file.type = "file"; file.accept = "image/*"; file.style.display = "none";
  file.addEventListener("change", () => loadBackground(file.files?.[0]));
  bar.append(file);
  button("Image", "Load an image as a background guide (not part of the sketch)", () => file.click());
  button("No image", "Remove the background guide", () => { state.background = ""; bgImage = null; commit(); });

  function setMode(m) {
    mode = m;
    drawBtn.style.fontWeight = m === "draw" ? "bold" : "normal";
    eraseBtn.style.fontWeight = m === "erase" ? "bold" : "normal";
  }
  setMode("draw");

  function loadBackground(f) {
    if (!f) return;
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => {
        const s = Math.min(1, MAX_BG / Math.max(img.width, img.height));
        const c = document.createElement("canvas");
        c.width = Math.round(img.width * s); c.height = Math.round(img.height * s);
        c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
        state.background = c.toDataURL("image/jpeg", 0.8);
        setBackground(state.background);
        commit();
      };
      img.src = reader.result;
    };
    reader.readAsDataURL(f);
  }

  function setBackground(url) {
    if (!url) { bgImage = null; redraw(); return; }
    const img = new Image();
    img.onload = () => { bgImage = img; redraw(); };
    img.src = url;
  }

  function strokePath(s) {
    const p = s.points;
    if (!p.length) return;
    ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.lineWidth = s.size;
    ctx.beginPath();
    ctx.moveTo(p[0][0], p[0][1]);
    for (let i = 1; i < p.length; i++) ctx.lineTo(p[i][0], p[i][1]);
    if (p.length === 1) ctx.lineTo(p[0][0] + 0.01, p[0][1]);
    ctx.stroke();
  }

  function redraw() {
    const [w, h] = size();
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    fit();
    if (!state.strokes.length && !current) { state.width = w; state.height = h; }  // nothing drawn yet: adopt the size
    ctx.globalAlpha = 1; ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
    if (bgImage) { ctx.globalAlpha = 0.35; ctx.drawImage(bgImage, 0, 0, w, h); ctx.globalAlpha = 1; }
    // Strokes are stored in the coordinates of the canvas size they were drawn at.
    const sx = w / (state.width || w), sy = h / (state.height || h);
    ctx.save(); ctx.scale(sx, sy);
    for (const s of [...state.strokes, ...(current ? [current] : [])]) {
      ctx.strokeStyle = s.mode === "erase" ? "#fff" : "#000";
      strokePath(s);
    }
    ctx.restore();
  }

  function commit() {
    data.value = JSON.stringify(state);
    data.callback?.(data.value);
    redraw();
    node.setDirtyCanvas?.(true, true);
  }

  // A pointer position in drawing coordinates (those of the size the strokes were drawn at), clamped to the
  // drawing; ``inside`` says whether it was on the drawing at all.
  function toCanvas(e) {
    const r = canvas.getBoundingClientRect();
    const [w, h] = size();
    const x = (e.clientX - r.left) / r.width * w, y = (e.clientY - r.top) / r.height * h;
    const inside = x >= 0 && y >= 0 && x <= w && y <= h;
    const cx = Math.min(Math.max(x, 0), w), cy = Math.min(Math.max(y, 0), h);
    const sx = (state.width || w) / w, sy = (state.height || h) / h;
    const p = [Math.round(cx * sx * 10) / 10, Math.round(cy * sy * 10) / 10];
    p.inside = inside;
    return p;
  }

  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault(); e.stopPropagation();
    const start = toCanvas(e);
    if (!start.inside) return;  // on the outline, not the drawing: no stroke
    canvas.setPointerCapture?.(e.pointerId);
    const [w] = size();
    current = { mode, size: brush * (state.width || w) / w, points: [[start[0], start[1]]] };
    redraw();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!current) return;
    e.preventDefault(); e.stopPropagation();
    const p = toCanvas(e);
    current.points.push([p[0], p[1]]);  // clamped to the drawing's edge
    redraw();
  });
  const finish = (e) => {
    if (!current) return;
    e?.stopPropagation?.();
    state.strokes.push(current);
    current = null;
    undo.length = 0;
    commit();
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  root.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z" && state.strokes.length) { undo.push(state.strokes.pop()); commit(); }
  });
  for (const ev of ["wheel", "mousedown", "mousemove", "mouseup"]) root.addEventListener(ev, (e) => e.stopPropagation());

  const view = node.addDOMWidget("sketch_canvas", "atelier_sketch_canvas", root, {
    serialize: false,
    getMinHeight: () => 200,
  });
  if (view) view.serialize = false;  // the drawing lives in "sketch"; this view adds no workflow value
  node.atelierSketch = {
    reload() { state = parseState(data.value, ...size()); setBackground(state.background); },
    redraw,
    get state() { return state; },
  };
  for (const wd of [wW, wH]) {
    if (!wd) continue;
    const cb = wd.callback;
    wd.callback = function () { const r = cb?.apply(this, arguments); redraw(); return r; };
  }
  if (!data.value) { data.value = JSON.stringify(state); }
  setBackground(state.background);
  const [w0, h0] = node.size || [0, 0];
  node.setSize?.([Math.max(w0, 320), Math.max(h0, 420)]);
}

app.registerExtension({
  name: "Atelier.SketchCanvas",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      setupCanvas(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      setupCanvas(this);
      this.atelierSketch?.reload();   // a loaded workflow brings its drawing back
      return r;
    };
  },
});
