// Review page: detect -> show boxes on the server-rendered preview -> accept/reject/draw -> /v1/feedback.
// The worklist panel (/v1/worklist) lists analysed studies, priority first; a click opens a study's
// results one image at a time in the same viewer.
"use strict";

const CLASS_NAMES = [
  "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
];
const COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
  "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8"];

const $ = (id) => document.getElementById(id);
const state = { result: null, image: null, scale: 1, verdicts: [], newBoxes: [], drag: null, study: null };

function apiKey() { return $("api-key").value.trim(); }
function headers(extra = {}) { return { Authorization: `Bearer ${apiKey()}`, ...extra }; }
function setStatus(id, text, kind = "") { const el = $(id); el.textContent = text; el.className = kind; }

async function errorText(resp) {
  try { const body = await resp.json(); return `${resp.status}: ${body.error.message}`; }
  catch { return `${resp.status} ${resp.statusText}`; }
}

function init() {
  $("api-key").value = sessionStorage.getItem("cxr-key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("cxr-key", apiKey()); loadWorklist(); });
  CLASS_NAMES.forEach((name, i) => $("new-class").add(new Option(`${i} ${name}`, String(i))));
  $("upload-form").addEventListener("submit", (e) => { e.preventDefault(); detect(); });
  $("submit").addEventListener("click", submitFeedback);
  $("no-finding").addEventListener("change", draw);
  const canvas = $("view");
  canvas.addEventListener("mousedown", startDrag);
  canvas.addEventListener("mousemove", moveDrag);
  canvas.addEventListener("mouseup", endDrag);
  $("worklist-refresh").addEventListener("click", loadWorklist);
  $("prev-image").addEventListener("click", () => stepStudy(-1));
  $("next-image").addEventListener("click", () => stepStudy(1));
  if (apiKey()) loadWorklist();
}

async function detect() {
  const file = $("file").files[0];
  if (!file) { setStatus("status", "choose a DICOM, PNG or JPEG file first", "error"); return; }
  setStatus("status", "detecting…");
  setStatus("feedback-status", "");
  const form = new FormData();
  form.append("file", file);
  const resp = await fetch("/v1/detect", { method: "POST", headers: headers(), body: form });
  if (!resp.ok) { setStatus("status", await errorText(resp), "error"); return; }
  const result = await resp.json();
  state.study = null; renderStudyNav();
  await showResult(result);
  loadWorklist();
}

// Shows one result (fresh from /v1/detect or opened from the worklist) on its server-rendered preview.
async function showResult(result) {
  const preview = await fetch(`/v1/results/${result.request_id}/preview.png`, { headers: headers() });
  if (!preview.ok) { setStatus("status", await errorText(preview), "error"); return; }
  const img = new Image();
  img.src = URL.createObjectURL(await preview.blob());
  await img.decode();
  Object.assign(state, { result, image: img, verdicts: result.detections.map(() => "accept"), newBoxes: [] });
  state.scale = img.naturalWidth / result.image.width;
  const canvas = $("view");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const total = result.timings_ms.total === undefined ? "" : ` · ${result.timings_ms.total.toFixed(0)} ms`;
  const triage = result.triage
    ? ` · triage ${result.triage.score.toFixed(2)}${result.triage.priority ? " (priority)" : ""}` : "";
  $("model-info").textContent = `model ${result.model.name} v${result.model.version} (${result.model.stage}) · ` +
    `${result.image.width}×${result.image.height}${total}${triage}`;
  $("no-finding").checked = false;
  $("submit").disabled = false;
  setStatus("status", `${result.detections.length} finding(s) · request ${result.request_id}`);
  renderLists(); draw();
}

// ----------------------------------------------------------------- worklist

async function loadWorklist() {
  if (!apiKey()) return;
  const resp = await fetch("/v1/worklist", { headers: headers() });
  if (!resp.ok) { setStatus("worklist-status", await errorText(resp), "error"); return; }
  const body = await resp.json();
  const list = $("worklist"); list.replaceChildren();
  body.studies.forEach((study) => {
    const li = document.createElement("li");
    li.className = study.priority ? "study priority" : "study";
    li.dataset.studyUid = study.study_uid;
    li.tabIndex = 0;
    li.title = `study ${study.study_uid}`;
    const seen = new Date(study.first_seen).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (study.priority) li.append(label("PRIORITY"));
    li.append(label(`${study.score.toFixed(2)} · ${study.images} image(s) · ${seen} · …${study.study_uid.slice(-8)}`));
    li.addEventListener("click", () => openStudy(study));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") openStudy(study); });
    list.append(li);
  });
  setStatus("worklist-status",
    `${body.studies.length} studies in the last ${body.hours} h · priority at score ≥ ${body.threshold}`);
}

async function openStudy(study) {
  state.study = { uid: study.study_uid, ids: study.result_ids, index: 0 };
  document.querySelectorAll("#worklist li.study").forEach((li) => {
    li.classList.toggle("open", li.dataset.studyUid === study.study_uid);
  });
  await openResult(0);
}

async function stepStudy(delta) {
  if (!state.study) return;
  const next = state.study.index + delta;
  if (next < 0 || next >= state.study.ids.length) return;
  await openResult(next);
}

async function openResult(index) {
  state.study.index = index;
  renderStudyNav();
  const id = state.study.ids[index];
  setStatus("status", "loading…");
  setStatus("feedback-status", "");
  const resp = await fetch(`/v1/results/${encodeURIComponent(id)}`, { headers: headers() });
  if (!resp.ok) { setStatus("status", await errorText(resp), "error"); return; }
  await showResult(await resp.json());
}

function renderStudyNav() {
  const nav = $("study-nav");
  nav.hidden = !state.study;
  if (!state.study) return;
  $("study-position").textContent = `image ${state.study.index + 1} of ${state.study.ids.length}`;
  $("prev-image").disabled = state.study.index === 0;
  $("next-image").disabled = state.study.index >= state.study.ids.length - 1;
}

// Lists are built with createElement/textContent only: class names and numbers come from the server.
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
    li.className = state.verdicts[i] === "reject" ? "rejected detection" : "detection";
    li.append(label(`${d.class_name} ${(d.confidence * 100).toFixed(0)}%`, COLORS[d.class_id]));
    const accept = document.createElement("button");
    accept.textContent = "Accept"; accept.className = "accept";
    accept.onclick = () => { state.verdicts[i] = "accept"; renderLists(); draw(); };
    const reject = document.createElement("button");
    reject.textContent = "Reject"; reject.className = "reject";
    reject.onclick = () => { state.verdicts[i] = "reject"; renderLists(); draw(); };
    li.append(accept, reject);
    list.append(li);
  });
  const added = $("new-boxes"); added.replaceChildren();
  state.newBoxes.forEach((b, i) => {
    const li = document.createElement("li");
    li.className = "new-box";
    li.append(label(`${CLASS_NAMES[b.class_id]} [${b.box.map((v) => v.toFixed(0)).join(", ")}]`));
    const remove = document.createElement("button");
    remove.textContent = "Remove";
    remove.onclick = () => { state.newBoxes.splice(i, 1); renderLists(); draw(); };
    li.append(remove);
    added.append(li);
  });
}

function strokeBox(ctx, box, color, dashed) {
  const s = state.scale;
  ctx.setLineDash(dashed ? [6, 4] : []);
  ctx.strokeStyle = color; ctx.lineWidth = 2;
  ctx.strokeRect(box[0] * s, box[1] * s, (box[2] - box[0]) * s, (box[3] - box[1]) * s);
}

function draw() {
  if (!state.image) return;
  const ctx = $("view").getContext("2d");
  ctx.drawImage(state.image, 0, 0);
  const noFinding = $("no-finding").checked;
  state.result.detections.forEach((d, i) => {
    if (state.verdicts[i] === "reject" || noFinding) return;
    strokeBox(ctx, d.box, COLORS[d.class_id], false);
    ctx.fillStyle = COLORS[d.class_id]; ctx.font = "12px sans-serif";
    ctx.fillText(`${d.class_name} ${(d.confidence * 100).toFixed(0)}%`, d.box[0] * state.scale + 2, d.box[1] * state.scale + 12);
  });
  state.newBoxes.forEach((b) => strokeBox(ctx, b.box, "#ffffff", true));
  if (state.drag && state.drag.current) strokeBox(ctx, dragBox(), "#ffffff", true);
}

function toImage(event) {
  const canvas = $("view"); const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * (canvas.width / rect.width) / state.scale;
  const y = (event.clientY - rect.top) * (canvas.height / rect.height) / state.scale;
  return [Math.max(0, Math.min(x, state.result.image.width)), Math.max(0, Math.min(y, state.result.image.height))];
}
function dragBox() {
  const [a, b] = [state.drag.start, state.drag.current];
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}
function startDrag(e) { if (state.result) state.drag = { start: toImage(e), current: null }; }
function moveDrag(e) { if (state.drag) { state.drag.current = toImage(e); draw(); } }
function endDrag(e) {
  if (!state.drag) return;
  state.drag.current = toImage(e);
  const box = dragBox();
  state.drag = null;
  if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) {
    state.newBoxes.push({ class_id: Number($("new-class").value), box });
    $("no-finding").checked = false;
  }
  renderLists(); draw();
}

async function submitFeedback() {
  const noFinding = $("no-finding").checked;
  const body = {
    request_id: state.result.request_id,
    feedback_id: `${state.result.request_id}-${Date.now()}`,
    reviews: state.verdicts.map((action, index) => ({ index, action: noFinding ? "reject" : action })),
    new_boxes: noFinding ? [] : state.newBoxes,
    no_finding: noFinding,
    comment: $("comment").value,
  };
  const resp = await fetch("/v1/feedback", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  if (!resp.ok) { setStatus("feedback-status", await errorText(resp), "error"); return; }
  const receipt = await resp.json();
  setStatus("feedback-status", `feedback ${receipt.status}: ${receipt.feedback_id} (${receipt.rows} rows)`, "ok");
}

init();
