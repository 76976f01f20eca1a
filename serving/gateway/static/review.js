// Review page: detect -> show boxes on the radiograph -> accept/reject/draw -> /v1/feedback.
// The worklist panel (/v1/worklist) lists analysed studies, priority first; a click opens a study's
// results one image at a time in the same viewer.
//
// The viewer: /v1/results/{id}/pixels gives the values behind the image (uint16, with their scale and
// the DICOM's own VOI window in X-CXR-* headers); window/level is applied here on a canvas, so a drag
// costs no round trip. The canvas and an SVG of the boxes sit in one "stage" sized in ORIGINAL image
// pixels (the boxes' coordinates) and zoomed/panned by one CSS transform, so boxes stay on the image.
"use strict";

const CLASS_NAMES = [
  "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
];
const COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
  "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8"];
const SVG_NS = "http://www.w3.org/2000/svg";
const ZOOM_STEP = 1.25;
const TOOLS = { window: "tool-window", pan: "tool-pan", draw: "tool-box" };
const WORKLIST_REFRESH_MS = 30_000;

const $ = (id) => document.getElementById(id);
const state = {
  result: null, verdicts: [], newBoxes: [], selected: -1, study: null,
  pixels: null, // {codes, cols, rows, slope, intercept, range, invert, voi: {center, width, fn}}
  win: null, // the window shown now: {center, width}
  view: { scale: 1, x: 0, y: 0, fitted: true }, // screen = image px * scale + (x, y), in CSS px
  tool: "window", toolBefore: "window", drag: null, renderQueued: false,
  saliency: { route: null, shown: false, urls: new Map() }, // urls: "id|box" -> object URL of its map
  load: 0, // number of the latest load (detection, study, image): a reply of an earlier one is dropped
  worklistLoad: 0, // number of the latest worklist listing: an earlier one answering late is dropped
  keyRefused: false, // the worklist answered 401/403: no timed refresh until the key changes
  feedback: null, // the shown result's feedback (see newFeedback)
};

function apiKey() { return $("api-key").value.trim(); }
function headers(extra = {}) { return { Authorization: `Bearer ${apiKey()}`, ...extra }; }
function setStatus(id, text, kind = "") { const el = $(id); el.textContent = text; el.className = kind; }

async function errorText(resp) {
  try { const body = await resp.json(); return `${resp.status}: ${body.error.message}`; }
  catch { return `${resp.status} ${resp.statusText}`; }
}

// Another key may be another reader or tenant, and no key is a reader who left: nothing the previous
// key opened (its worklist, the shown image and its unsent review) stays on screen.
function keyChanged() {
  sessionStorage.setItem("cxr-key", apiKey());
  state.keyRefused = false;
  beginLoad();
  state.study = null; renderStudyNav();
  setStatus("status", "");
  loadWorklist();
}

function init() {
  $("api-key").value = sessionStorage.getItem("cxr-key") || "";
  $("api-key").addEventListener("change", keyChanged);
  CLASS_NAMES.forEach((name, i) => $("new-class").add(new Option(`${i} ${name}`, String(i))));
  $("upload-form").addEventListener("submit", (e) => { e.preventDefault(); detect(); });
  $("submit").addEventListener("click", submitFeedback);
  $("no-finding").addEventListener("change", () => { reviewChanged(); draw(); });
  $("comment").addEventListener("input", reviewChanged);
  const viewport = $("viewport");
  viewport.addEventListener("pointerdown", startDrag);
  viewport.addEventListener("pointermove", moveDrag);
  viewport.addEventListener("pointerup", endDrag);
  viewport.addEventListener("pointercancel", () => { state.drag = null; draw(); });
  viewport.addEventListener("wheel", wheelZoom, { passive: false });
  viewport.addEventListener("contextmenu", (e) => e.preventDefault()); // right-drag pans
  new ResizeObserver(() => { if (state.result) { if (state.view.fitted) fit(); else applyView(); } }).observe(viewport);
  Object.entries(TOOLS).forEach(([tool, id]) => $(id).addEventListener("click", () => setTool(tool)));
  $("zoom-in").addEventListener("click", () => zoomCentered(ZOOM_STEP));
  $("zoom-out").addEventListener("click", () => zoomCentered(1 / ZOOM_STEP));
  $("fit").addEventListener("click", fit);
  $("window-reset").addEventListener("click", resetWindow);
  $("saliency-toggle").addEventListener("click", toggleSaliency);
  document.addEventListener("keydown", onKey);
  setTool("window");
  $("worklist-refresh").addEventListener("click", loadWorklist);
  // studies arrive from the PACS while the page is open: the list follows without a click
  // (not with a refused key: each try would count against this address's auth-failure limit)
  const refresh = () => { if (!document.hidden && !state.keyRefused) loadWorklist(); };
  setInterval(refresh, WORKLIST_REFRESH_MS);
  document.addEventListener("visibilitychange", refresh);
  $("prev-image").addEventListener("click", () => stepStudy(-1));
  $("next-image").addEventListener("click", () => stepStudy(1));
  if (apiKey()) loadWorklist();
}

async function detect() {
  const file = $("file").files[0];
  if (!file) { setStatus("status", "choose a DICOM, PNG or JPEG file first", "error"); return; }
  const load = beginLoad();
  state.study = null; renderStudyNav(); markOpenStudy(null);
  setStatus("status", "detecting…");
  const form = new FormData();
  form.append("file", file);
  let result;
  try {
    const resp = await fetch("/v1/detect", { method: "POST", headers: headers(), body: form });
    if (!resp.ok) { loadFailed(load, `detection failed: ${await errorText(resp)}`); return; }
    result = await resp.json();
  } catch (err) { loadFailed(load, `detection failed: ${err.message}`); return; }
  if (isCurrent(load)) await showResult(result, load);
  loadWorklist();
}

// ------------------------------------------------------------------ opening a result
// Each load (a detection, a worklist study, Previous/Next) first clears what was shown and takes
// the next number; its replies are dropped once a later load has begun, so a slow reply never paints
// one patient's image under another's name, and a failed load leaves nothing of the previous study.

function beginLoad() {
  state.load += 1;
  clearResult();
  return state.load;
}

function isCurrent(load) { return load === state.load; }

// The failure of a load, in the status line (the server's message: ids, never patient data).
function loadFailed(load, text) { if (isCurrent(load)) setStatus("status", text, "error"); }

function clearResult() {
  hideSaliency(); forgetSaliency();
  Object.assign(state, {
    result: null, pixels: null, win: null, verdicts: [], newBoxes: [], selected: -1, drag: null, feedback: null,
  });
  const canvas = $("view");
  canvas.width = 1; canvas.height = 1; // a resize clears the canvas
  canvas.getContext("2d").clearRect(0, 0, 1, 1);
  delete canvas.dataset.window;
  Object.assign($("stage").style, { width: "0px", height: "0px" });
  $("overlay").replaceChildren(); $("overlay").removeAttribute("viewBox");
  $("saliency").removeAttribute("src");
  $("detections").replaceChildren(); $("new-boxes").replaceChildren();
  $("model-info").textContent = ""; $("zoom-level").textContent = "";
  const readout = $("window-level");
  readout.textContent = ""; delete readout.dataset.center; delete readout.dataset.width;
  $("no-finding").checked = false; $("comment").value = "";
  setStatus("feedback-status", "");
  updateSubmit();
}

// Shows one result (fresh from /v1/detect or opened from the worklist), fitted to the viewer, unless
// a later load began meanwhile.
async function showResult(result, load) {
  let pixels;
  try {
    const resp = await fetch(`/v1/results/${encodeURIComponent(result.request_id)}/pixels`, { headers: headers() });
    if (!isCurrent(load)) return;
    if (!resp.ok) { loadFailed(load, `the image could not be shown: ${await errorText(resp)}`); return; }
    pixels = readPixels(resp.headers, await resp.arrayBuffer());
  } catch (err) { loadFailed(load, `the image could not be shown: ${err.message}`); return; }
  if (!isCurrent(load)) return;
  Object.assign(state, {
    result, pixels, verdicts: result.detections.map(() => "accept"), newBoxes: [], drag: null,
    selected: result.detections.length ? 0 : -1, win: { center: pixels.voi.center, width: pixels.voi.width },
    feedback: newFeedback(),
  });
  const canvas = $("view");
  canvas.width = pixels.cols; canvas.height = pixels.rows;
  const { width, height } = result.image;
  Object.assign($("stage").style, { width: `${width}px`, height: `${height}px` });
  $("overlay").setAttribute("viewBox", `0 0 ${width} ${height}`);
  const total = result.timings_ms.total === undefined ? "" : ` · ${result.timings_ms.total.toFixed(0)} ms`;
  const triage = result.triage
    ? ` · triage ${scoreText(result.triage.score)}${result.triage.priority ? " (priority)" : ""}` : "";
  $("model-info").textContent = `model ${result.model.name} v${result.model.version} (${result.model.stage}) · ` +
    `${width}×${height}${total}${triage}`;
  $("no-finding").checked = false;
  updateSubmit();
  setStatus("status", `${result.detections.length} finding(s) · request ${result.request_id}`);
  renderImage(); renderLists(); fit();
  showSaliencyButton();
}

// X-CXR-* headers of /pixels: value = code * slope + intercept; the window is the source's own VOI.
function readPixels(h, buffer) {
  const num = (name) => Number(h.get(`X-CXR-${name}`));
  const cols = num("Columns"); const rows = num("Rows");
  const codes = new Uint16Array(buffer); // little-endian, as every platform a browser runs on
  if (codes.length !== cols * rows) throw new Error(`pixels: ${codes.length} values for ${cols}×${rows}`);
  const slope = num("Value-Slope"); const intercept = num("Value-Intercept");
  const voi = { center: num("Window-Center"), width: num("Window-Width"),
    fn: (h.get("X-CXR-Window-Function") || "LINEAR").toUpperCase() };
  return { codes, cols, rows, slope, intercept, range: slope * 65535 || 1, invert: h.get("X-CXR-Invert") === "1", voi };
}

// ------------------------------------------------------------------ window / level

// One RGBA word per 16-bit code: the DICOM window (PS3.3 C.11.2.1.2), MONOCHROME1 inverted.
function windowLut(p, center, width) {
  const lut = new Uint32Array(65536);
  for (let code = 0; code < 65536; code++) {
    const v = code * p.slope + p.intercept;
    let y;
    if (p.voi.fn === "SIGMOID") y = 1 / (1 + Math.exp((-4 * (v - center)) / width));
    else if (p.voi.fn === "LINEAR_EXACT") y = (v - (center - width / 2)) / width;
    else if (width <= 1) y = v > center - 0.5 ? 1 : 0;
    else y = (v - (center - 0.5)) / (width - 1) + 0.5;
    y = Math.min(1, Math.max(0, y));
    const g = Math.round((p.invert ? 1 - y : y) * 255);
    lut[code] = (0xff000000 | (g << 16) | (g << 8) | g) >>> 0; // bytes R, G, B, A on little-endian
  }
  return lut;
}

function renderImage() {
  const p = state.pixels;
  if (!p) return;
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(p.cols, p.rows);
  const out = new Uint32Array(img.data.buffer);
  const lut = windowLut(p, state.win.center, state.win.width);
  for (let i = 0; i < p.codes.length; i++) out[i] = lut[p.codes[i]];
  ctx.putImageData(img, 0, 0);
  canvas.dataset.window = `${state.win.center} ${state.win.width}`;
  const fmt = (v) => (p.range >= 100 ? Math.round(v).toString() : v.toPrecision(3));
  const readout = $("window-level");
  readout.textContent = `W ${fmt(state.win.width)} · L ${fmt(state.win.center)}`;
  readout.dataset.center = String(state.win.center); readout.dataset.width = String(state.win.width);
}

function scheduleRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => { state.renderQueued = false; renderImage(); });
}

function minWidth() { return state.pixels.voi.fn === "LINEAR" ? 1 : state.pixels.range / 4096; }
function resetWindow() { if (!state.pixels) return; state.win = { center: state.pixels.voi.center, width: state.pixels.voi.width }; renderImage(); }

// ------------------------------------------------------------------ zoom / pan

function viewportSize() { const vp = $("viewport"); return [vp.clientWidth, vp.clientHeight]; }
function fitScale() {
  const [w, h] = viewportSize();
  return Math.min(w / state.result.image.width, h / state.result.image.height);
}

function fit() {
  if (!state.result) return;
  const [w, h] = viewportSize(); const s = fitScale();
  const { width, height } = state.result.image;
  state.view = { scale: s, x: (w - width * s) / 2, y: (h - height * s) / 2, fitted: true };
  applyView();
}

// Zoom by ``factor`` keeping the image point under (cx, cy) (viewport CSS px) where it is.
function zoomAt(factor, cx, cy) {
  if (!state.result) return;
  const v = state.view; const fs = fitScale();
  const scale = Math.min(Math.max(v.scale * factor, fs / 2), Math.max(fs * 32, 8));
  const k = scale / v.scale;
  state.view = { scale, x: cx - (cx - v.x) * k, y: cy - (cy - v.y) * k, fitted: false };
  applyView();
}
function zoomCentered(factor) { const [w, h] = viewportSize(); zoomAt(factor, w / 2, h / 2); }

function wheelZoom(e) {
  if (!state.result) return;
  e.preventDefault();
  const r = $("viewport").getBoundingClientRect();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left - $("viewport").clientLeft, e.clientY - r.top - $("viewport").clientTop);
}

function applyView() {
  const v = state.view;
  $("stage").style.transform = `translate(${v.x}px, ${v.y}px) scale(${v.scale})`;
  $("zoom-level").textContent = `${Math.round(v.scale * 100)}%`;
  draw(); // label sizes follow the zoom
}

// When the selected box is (partly) off screen, centre it without changing the zoom.
function revealBox(box) {
  const v = state.view; const [w, h] = viewportSize();
  const x0 = box[0] * v.scale + v.x; const x1 = box[2] * v.scale + v.x;
  const y0 = box[1] * v.scale + v.y; const y1 = box[3] * v.scale + v.y;
  if (x0 >= 0 && y0 >= 0 && x1 <= w && y1 <= h) return;
  const cx = ((box[0] + box[2]) / 2) * v.scale; const cy = ((box[1] + box[3]) / 2) * v.scale;
  state.view = { ...v, x: w / 2 - cx, y: h / 2 - cy, fitted: false };
  applyView();
}

// ------------------------------------------------------------------ mouse

function setTool(tool) {
  if (tool === "draw" && state.tool !== "draw") state.toolBefore = state.tool;
  state.tool = tool;
  Object.entries(TOOLS).forEach(([name, id]) => $(id).setAttribute("aria-pressed", String(name === tool)));
  const vp = $("viewport");
  ["window", "pan", "draw"].forEach((name) => vp.classList.toggle(name, name === tool));
}

function toImage(event) {
  const r = $("view").getBoundingClientRect(); const { width, height } = state.result.image;
  const x = ((event.clientX - r.left) / r.width) * width;
  const y = ((event.clientY - r.top) / r.height) * height;
  return [Math.max(0, Math.min(x, width)), Math.max(0, Math.min(y, height))];
}
function dragBox() {
  const [a, b] = [state.drag.start, state.drag.current];
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

// Left button: the tool (window/level, pan or new box); right or middle button, or Shift: pan.
function startDrag(e) {
  if (!state.result) return;
  const vp = $("viewport");
  vp.focus({ preventScroll: true });
  let mode = null;
  if (e.button === 0) mode = e.shiftKey ? "pan" : state.tool;
  else if (e.button === 1 || e.button === 2) mode = "pan";
  if (!mode) return;
  e.preventDefault();
  try { vp.setPointerCapture(e.pointerId); } catch { /* a synthetic pointer may not be capturable */ }
  state.drag = { mode, x0: e.clientX, y0: e.clientY, moved: false, view0: { ...state.view }, win0: { ...state.win },
    start: toImage(e), current: null };
  vp.classList.add("dragging", mode);
}

function moveDrag(e) {
  const d = state.drag;
  if (!d) return;
  const dx = e.clientX - d.x0; const dy = e.clientY - d.y0;
  if (Math.abs(dx) + Math.abs(dy) > 2) d.moved = true;
  if (d.mode === "pan") {
    state.view = { ...d.view0, x: d.view0.x + dx, y: d.view0.y + dy, fitted: false };
    applyView();
  } else if (d.mode === "window") {
    const k = state.pixels.range / 512; // sideways: width, up/down: level
    state.win = { center: d.win0.center + dy * k, width: Math.max(minWidth(), d.win0.width + dx * k) };
    scheduleRender();
  } else {
    d.current = toImage(e);
    draw();
  }
}

function endDrag(e) {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  const vp = $("viewport");
  vp.classList.remove("dragging");
  if (d.mode !== state.tool) vp.classList.remove(d.mode);
  if (d.mode === "draw") {
    d.current = toImage(e);
    const box = [Math.min(d.start[0], d.current[0]), Math.min(d.start[1], d.current[1]),
      Math.max(d.start[0], d.current[0]), Math.max(d.start[1], d.current[1])];
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) {
      state.newBoxes.push({ class_id: Number($("new-class").value), box });
      $("no-finding").checked = false;
      reviewChanged();
      setTool(state.toolBefore); // "new box" draws one box
    }
    renderLists(); draw();
  } else if (!d.moved && e.button === 0) {
    selectAt(toImage(e));
  }
}

// A click selects the smallest shown box under the pointer.
function selectAt([x, y]) {
  if ($("no-finding").checked) return;
  let best = -1; let bestArea = Infinity;
  state.result.detections.forEach((d, i) => {
    const [x0, y0, x1, y1] = d.box;
    const area = (x1 - x0) * (y1 - y0);
    if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && area < bestArea) { best = i; bestArea = area; }
  });
  if (best >= 0) select(best);
}

// ------------------------------------------------------------------ keyboard

const KEYS = {
  n: () => selectStep(1), ArrowRight: () => selectStep(1), p: () => selectStep(-1), ArrowLeft: () => selectStep(-1),
  a: () => setVerdict(state.selected, "accept"), r: () => setVerdict(state.selected, "reject"),
  b: () => setTool("draw"), Escape: () => { state.drag = null; if (state.tool === "draw") setTool(state.toolBefore); draw(); },
  "+": () => zoomCentered(ZOOM_STEP), "=": () => zoomCentered(ZOOM_STEP),
  "-": () => zoomCentered(1 / ZOOM_STEP), _: () => zoomCentered(1 / ZOOM_STEP),
  0: fit, w: resetWindow, s: () => toggleSaliency(),
};

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || !state.result) return;
  const t = e.target;
  if (t instanceof HTMLElement && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
  const action = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (!action) return;
  e.preventDefault();
  action();
}

function select(i) {
  state.selected = i;
  renderLists(); draw();
  const li = document.querySelector(`#detections li[data-index="${i}"]`);
  if (li) li.scrollIntoView({ block: "nearest" });
  if (i >= 0) revealBox(state.result.detections[i].box);
  if (state.saliency.shown) showSaliencyMap();
}
function selectStep(delta) {
  const n = state.result.detections.length;
  if (n) select(state.selected < 0 ? 0 : (state.selected + delta + n) % n);
}
function setVerdict(i, action) {
  if (i < 0 || i >= state.verdicts.length) return;
  if (state.verdicts[i] !== action) reviewChanged();
  state.verdicts[i] = action;
  renderLists(); draw();
}

// ------------------------------------------------------------------ saliency
// GET /v1/results/{id}/saliency.png?box=i: where the model looked for box i (occlusion on the served
// model, computed on the gateway on first request, then cached), an RGBA PNG of the radiograph's
// aspect laid over it (45 % opacity) in the stage, so it zooms and pans with the image. The map
// follows the selected box; with no box selected it is all boxes' at once. The button stays hidden
// unless the gateway's /openapi.json lists a GET /v1/results/{request_id}/saliency… path.
const SALIENCY_PATH = /^\/v1\/results\/\{request_id\}\/saliency[^/]*$/;
let saliencyProbe = null;

function findSaliencyRoute() {
  saliencyProbe = saliencyProbe || fetch("/openapi.json")
    .then((resp) => (resp.ok ? resp.json() : { paths: {} }))
    .then((spec) => Object.keys(spec.paths || {}).find((p) => SALIENCY_PATH.test(p) && spec.paths[p].get) || null)
    .catch(() => null);
  return saliencyProbe;
}

async function showSaliencyButton() {
  state.saliency.route = await findSaliencyRoute();
  $("saliency-toggle").hidden = !state.saliency.route;
}

function hideSaliency() {
  state.saliency.shown = false;
  $("saliency").hidden = true;
  $("saliency-toggle").setAttribute("aria-pressed", "false");
}

function forgetSaliency() {
  state.saliency.urls.forEach((url) => URL.revokeObjectURL(url));
  state.saliency.urls.clear();
}

// Shows the map of the selected box (fetched once per result and box); a selection or result that
// changed while it was computed wins.
async function showSaliencyMap() {
  const sal = state.saliency;
  const id = state.result.request_id;
  const box = state.selected;
  const key = `${id}|${box}`;
  let url = sal.urls.get(key);
  if (!url) {
    $("saliency").hidden = true; // never another box's map meanwhile
    const toggle = $("saliency-toggle");
    toggle.classList.add("busy");
    const query = box >= 0 ? `?box=${box}` : "";
    const resp = await fetch(sal.route.replace("{request_id}", encodeURIComponent(id)) + query, { headers: headers() });
    toggle.classList.remove("busy");
    if (!resp.ok) {
      setStatus("status", `saliency: ${await errorText(resp)}`, "error");
      if (state.result && state.result.request_id === id && state.selected === box) hideSaliency();
      return;
    }
    url = URL.createObjectURL(await resp.blob());
    if (!state.result || state.result.request_id !== id) { URL.revokeObjectURL(url); return; }
    sal.urls.set(key, url);
  }
  if (!sal.shown || state.result.request_id !== id || state.selected !== box) return;
  $("saliency").src = url;
  $("saliency").dataset.box = String(box);
  $("saliency").hidden = false;
}

async function toggleSaliency() {
  const sal = state.saliency;
  if (!sal.route || !state.result) return;
  if (sal.shown) { hideSaliency(); return; }
  sal.shown = true;
  $("saliency-toggle").setAttribute("aria-pressed", "true");
  await showSaliencyMap();
}

// ----------------------------------------------------------------- worklist

// Scores shown cut (not rounded) to 2 decimals: 0.4996 is below a 0.5 threshold and must not read 0.50.
function scoreText(score) { return (Math.floor(Math.round(score * 1e4) / 100) / 100).toFixed(2); }

// When a study came in: the time of day, with the date unless it is today (the list spans days).
function seenText(iso) {
  const seen = new Date(iso);
  const time = seen.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (seen.toDateString() === new Date().toDateString()) return time;
  return `${seen.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
}

// The list is what the gateway answered last for this key, or empty with the reason: a failed or
// superseded listing never leaves an older list (maybe another key's) on screen as if it were current.
async function loadWorklist() {
  const load = ++state.worklistLoad;
  const current = () => load === state.worklistLoad;
  const fail = (text) => {
    if (current()) { $("worklist").replaceChildren(); setStatus("worklist-status", text, "error"); }
  };
  if (!apiKey()) { $("worklist").replaceChildren(); setStatus("worklist-status", ""); return; }
  let body;
  try {
    const resp = await fetch("/v1/worklist", { headers: headers() });
    if (!resp.ok) {
      if (current()) state.keyRefused = resp.status === 401 || resp.status === 403;
      fail(`worklist: ${await errorText(resp)}`); return;
    }
    state.keyRefused = false;
    body = await resp.json();
  } catch (err) { fail(`worklist: ${err.message}`); return; }
  if (current()) renderWorklist(body);
}

function renderWorklist(body) {
  const list = $("worklist");
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.studyUid : null;
  list.replaceChildren();
  body.studies.forEach((study) => {
    const li = document.createElement("li");
    li.className = study.priority ? "study priority" : "study";
    li.classList.toggle("open", !!state.study && state.study.uid === study.study_uid);
    li.dataset.studyUid = study.study_uid;
    li.tabIndex = 0;
    li.title = `study ${study.study_uid}`;
    if (study.priority) li.append(label("PRIORITY"));
    li.append(label(`${scoreText(study.score)} · ${study.images} image${study.images === 1 ? '' : 's'} · ` +
      `${seenText(study.first_seen)} · …${study.study_uid.slice(-8)}`));
    li.addEventListener("click", () => openStudy(study));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") openStudy(study); });
    list.append(li);
    if (study.study_uid === focused) li.focus({ preventScroll: true }); // a refresh keeps the keyboard's place
  });
  setStatus("worklist-status",
    `${body.studies.length} ${body.studies.length === 1 ? 'study' : 'studies'} in the last ${body.hours} h · priority at score ≥ ${body.threshold}`);
}

async function openStudy(study) {
  state.study = { uid: study.study_uid, ids: study.result_ids, index: 0 };
  markOpenStudy(study.study_uid);
  await openResult(0);
}

function markOpenStudy(uid) {
  document.querySelectorAll("#worklist li.study").forEach((li) => li.classList.toggle("open", li.dataset.studyUid === uid));
}

async function stepStudy(delta) {
  if (!state.study) return;
  const next = state.study.index + delta;
  if (next < 0 || next >= state.study.ids.length) return;
  await openResult(next);
}

async function openResult(index) {
  const load = beginLoad();
  state.study.index = index;
  renderStudyNav();
  const id = state.study.ids[index];
  const what = `image ${index + 1} of ${state.study.ids.length} could not be opened`;
  setStatus("status", "loading…");
  let result;
  try {
    const resp = await fetch(`/v1/results/${encodeURIComponent(id)}`, { headers: headers() });
    if (!isCurrent(load)) return;
    if (!resp.ok) { loadFailed(load, `${what}: ${await errorText(resp)}`); return; }
    result = await resp.json();
  } catch (err) { loadFailed(load, `${what}: ${err.message}`); return; }
  if (isCurrent(load)) await showResult(result, load);
}

function renderStudyNav() {
  const nav = $("study-nav");
  nav.hidden = !state.study;
  if (!state.study) return;
  $("study-position").textContent = `image ${state.study.index + 1} of ${state.study.ids.length}`;
  $("prev-image").disabled = state.study.index === 0;
  $("next-image").disabled = state.study.index >= state.study.ids.length - 1;
}

// ------------------------------------------------------------------ lists and boxes
// Built with createElement/textContent only: class names and numbers come from the server.
function label(text, color) {
  const span = document.createElement("span");
  span.className = "label";
  span.textContent = text;
  if (color) span.style.color = color;
  return span;
}

function renderLists() {
  const list = $("detections"); list.replaceChildren();
  state.result.detections.forEach((d, i) => {
    const li = document.createElement("li");
    li.dataset.index = String(i);
    li.className = [state.verdicts[i] === "reject" ? "rejected" : "", "detection", i === state.selected ? "selected" : ""]
      .filter(Boolean).join(" ");
    li.append(label(`${d.class_name} ${(d.confidence * 100).toFixed(0)}%`, COLORS[d.class_id]));
    const accept = document.createElement("button");
    accept.textContent = "Accept"; accept.className = "accept"; accept.type = "button";
    accept.onclick = (e) => { e.stopPropagation(); state.selected = i; setVerdict(i, "accept"); };
    const reject = document.createElement("button");
    reject.textContent = "Reject"; reject.className = "reject"; reject.type = "button";
    reject.onclick = (e) => { e.stopPropagation(); state.selected = i; setVerdict(i, "reject"); };
    li.append(accept, reject);
    li.addEventListener("click", () => select(i));
    list.append(li);
  });
  const added = $("new-boxes"); added.replaceChildren();
  state.newBoxes.forEach((b, i) => {
    const li = document.createElement("li");
    li.className = "new-box";
    li.append(label(`${CLASS_NAMES[b.class_id]} [${b.box.map((v) => v.toFixed(0)).join(", ")}]`));
    const remove = document.createElement("button");
    remove.textContent = "Remove"; remove.type = "button";
    remove.onclick = () => { state.newBoxes.splice(i, 1); reviewChanged(); renderLists(); draw(); };
    li.append(remove);
    added.append(li);
  });
}

function svgBox(box, className, color) {
  const rect = document.createElementNS(SVG_NS, "rect");
  rect.setAttribute("class", className);
  rect.setAttribute("x", String(box[0])); rect.setAttribute("y", String(box[1]));
  rect.setAttribute("width", String(box[2] - box[0])); rect.setAttribute("height", String(box[3] - box[1]));
  if (color) rect.setAttribute("stroke", color);
  return rect;
}

function svgLabel(text, box, color) {
  const s = state.view.scale;
  const el = document.createElementNS(SVG_NS, "text");
  el.setAttribute("x", String(box[0] + 4 / s)); el.setAttribute("y", String(box[1] + 16 / s));
  el.setAttribute("font-size", String(13 / s)); el.setAttribute("stroke-width", String(3 / s));
  el.setAttribute("fill", color);
  el.textContent = text;
  return el;
}

// The overlay, in original image pixels: the stage's transform zooms and pans it with the image.
function draw() {
  const svg = $("overlay");
  svg.replaceChildren();
  if (!state.result) return;
  if (!$("no-finding").checked) {
    state.result.detections.forEach((d, i) => {
      const rejected = state.verdicts[i] === "reject";
      const selected = i === state.selected;
      const rect = svgBox(d.box, ["det", rejected ? "rejected" : "", selected ? "selected" : ""].filter(Boolean).join(" "),
        rejected ? null : COLORS[d.class_id]);
      rect.dataset.index = String(i);
      svg.append(rect);
      if (!rejected || selected) {
        const text = `${i + 1} ${d.class_name} ${(d.confidence * 100).toFixed(0)}%${rejected ? " (rejected)" : ""}`;
        svg.append(svgLabel(text, d.box, rejected ? "#bbb" : "#fff")); // white on a black halo reads on any class colour
      }
    });
  }
  state.newBoxes.forEach((b) => { svg.append(svgBox(b.box, "new", null), svgLabel(CLASS_NAMES[b.class_id], b.box, "#fff")); });
  if (state.drag && state.drag.mode === "draw" && state.drag.current) svg.append(svgBox(dragBox(), "new drawing", null));
}

// ------------------------------------------------------------------ feedback
// One feedback per shown result: its feedback_id is drawn when the result is shown and sent again on
// every retry, so the gateway's idempotency check answers "duplicate" to a retry after a lost reply
// instead of storing the same boxes twice. Submit is disabled while a submission is in flight and,
// once the gateway took it, until the review changes.

// firstBody: what the first try sent; a retry that differs and gets "duplicate" was not stored as sent.
function newFeedback() { return { id: randomId(), inFlight: false, sent: false, editedInFlight: false, firstBody: null }; }

// 128 random bits in hex (crypto.randomUUID exists only in a secure context: https or localhost).
function randomId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function updateSubmit() {
  const fb = state.feedback;
  $("submit").disabled = !state.result || !fb || fb.inFlight || fb.sent;
}

// A verdict, a box, "no finding" or the comment changed.
function reviewChanged() {
  const fb = state.feedback;
  if (!fb) return;
  if (fb.inFlight) fb.editedInFlight = true;
  // A change after the gateway took the feedback makes a NEW feedback with its own id: the reviewer
  // corrects their review, and the gateway keeps both (the stored one is not replaced).
  if (fb.sent) { state.feedback = newFeedback(); updateSubmit(); }
}

// Whether a 409 says the feedback id was already used with another body (the body is read only then).
async function reusedId(resp) {
  const answer = await resp.clone().json().catch(() => ({}));
  return ((answer || {}).error || {}).code === "feedback_id_reused";
}

async function submitFeedback() {
  const fb = state.feedback;
  if (!state.result || !fb || fb.inFlight || fb.sent) return;
  fb.inFlight = true; fb.editedInFlight = false;
  updateSubmit();
  setStatus("feedback-status", "sending…");
  const noFinding = $("no-finding").checked;
  const body = {
    request_id: state.result.request_id,
    feedback_id: fb.id, // the same on a retry: the gateway stores it once
    reviews: state.verdicts.map((action, index) => ({ index, action: noFinding ? "reject" : action })),
    new_boxes: noFinding ? [] : state.newBoxes,
    no_finding: noFinding,
    comment: $("comment").value,
  };
  const payload = JSON.stringify(body);
  if (fb.firstBody === null) fb.firstBody = payload;
  let text; let ok = false; let unsent = false;
  try {
    const resp = await fetch("/v1/feedback", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: payload,
    });
    if (resp.ok) {
      const receipt = await resp.json();
      ok = true;
      unsent = receipt.status === "duplicate" && payload !== fb.firstBody; // an earlier try was kept
      text = receipt.status === "duplicate"
        ? `feedback already stored: ${receipt.feedback_id} (not stored again)`
        : `feedback ${receipt.status}: ${receipt.feedback_id} (${receipt.rows} rows)`;
    } else if (resp.status === 409 && (await reusedId(resp))) {
      // an earlier try of this feedback id was stored (its reply lost) and the review changed since:
      // that one is kept, the changes become a new feedback below (retrying the id would be refused)
      ok = true; unsent = true;
      text = "an earlier version of this feedback was already stored";
    } else {
      text = await errorText(resp);
    }
  } catch (err) { text = err.message; }
  fb.inFlight = false;
  if (state.feedback !== fb) return; // another result was opened meanwhile
  if (!ok) {
    // the gateway may have stored it before the reply was lost: a retry sends the same id
    setStatus("feedback-status", `feedback not confirmed: ${text} · Submit again to retry`, "error");
    updateSubmit();
    return;
  }
  fb.sent = true;
  if (fb.editedInFlight || unsent) { // the kept feedback may lack the latest changes: they are a new feedback
    state.feedback = newFeedback();
    text += " · your latest changes may not be in it: submit again to send them";
  }
  setStatus("feedback-status", text, "ok");
  updateSubmit();
}

init();
