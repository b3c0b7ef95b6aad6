// Live training view for the DreamBooth nodes (ComfyUI front-end extension, no dependencies).
//
// DreamBooth Train gets a panel under its widgets: step / total, speed, time left, a loss chart
// (instance and prior loss), the latest preview image, and after the run the final curve and
// where the LoRA was saved. DreamBooth Class Images shows how many images were reused from the
// cache and how many generated. Data come from the pack's websocket events (nodes/live.py) and,
// when the page (re)loads or events stop arriving, from GET /dreambooth/runs, so a page reloaded
// mid-run picks the run up again. Runs are keyed by node id: several Train nodes each draw theirs.
//
// For tests and the curious, `window.DreamBoothLive.state(nodeId)` summarises what a node shows.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawLossChart } from "./loss_chart.js";

const TRAIN = "DreamBoothTrain";
const CLASS_IMAGES = "DreamBoothClassImages";
const POLL_MS = 5000;      // how often to check for a stalled event stream
const STALE_MS = 5000;     // no event for this long while a run is "running": ask the server
const MAX_POINTS = 4000;   // points kept per run in the page (halved by striding beyond this)

const runs = new Map();        // node id -> run state (see newRun)
const classSets = new Map();   // node id -> {count, generated, reused, done, folder}
const views = new Set();       // live panels: {node, kind, el, render}
let lastEvent = 0;

// -- state ------------------------------------------------------------------------------------

function newRun(data) {
  return {
    run_id: data.run_id, node: String(data.node), status: "running", step: 0, total: data.total || 0,
    loss: null, instance_loss: null, prior_loss: null, seconds_per_step: null, eta_seconds: null,
    points: [], preview: null, preview_step: null, lora_path: null, message: "", seconds: null,
    label: data.label || "", started: data.started || null, source: "event",
  };
}

function runFor(data) {
  const key = String(data.node);
  let run = runs.get(key);
  if (!run || run.run_id !== data.run_id) {
    run = newRun(data);
    runs.set(key, run);
  }
  return run;
}

function addPoints(run, points) {
  const last = run.points.length ? run.points[run.points.length - 1][0] : -Infinity;
  for (const p of points || []) if (p[0] > last) run.points.push(p);
  if (run.points.length > MAX_POINTS) {
    const keepLast = run.points[run.points.length - 1];
    run.points = run.points.filter((_, i) => i % 2 === 0);
    if (run.points[run.points.length - 1] !== keepLast) run.points.push(keepLast);
  }
}

function mergePoints(a, b) {
  const byStep = new Map();
  for (const p of a || []) byStep.set(p[0], p);
  for (const p of b || []) byStep.set(p[0], p);
  return [...byStep.values()].sort((x, y) => x[0] - y[0]);
}

const STEP_FIELDS = ["step", "total", "loss", "instance_loss", "prior_loss", "seconds_per_step", "eta_seconds"];

function onStart({ detail }) {
  runs.set(String(detail.node), newRun(detail));
  touched(detail.node);
}

function onStep({ detail }) {
  const run = runFor(detail);
  for (const k of STEP_FIELDS) if (k in detail) run[k] = detail[k];
  addPoints(run, detail.points);
  touched(detail.node);
}

function onPreview({ detail }) {
  const run = runFor(detail);
  run.preview = detail.image;
  run.preview_step = detail.step;
  touched(detail.node);
}

function onDone({ detail }) {
  const run = runFor(detail);
  Object.assign(run, {
    status: detail.status, step: detail.step, total: detail.total, lora_path: detail.lora_path,
    message: detail.message || "", seconds: detail.seconds,
  });
  // The final curve replaces the live one only where it is at least as complete.
  if ((detail.points || []).length >= run.points.length) run.points = detail.points.slice();
  touched(detail.node);
}

function onClassImages({ detail }) {
  classSets.set(String(detail.node), detail);
  touched(detail.node);
}

/** Merge the server's snapshot: the runs this page missed (reload, a stalled socket). */
function applySnapshot(snap) {
  for (const s of snap.runs || []) {
    const key = String(s.node);
    const mine = runs.get(key);
    if (mine && mine.run_id !== s.run_id && mine.started && s.started && mine.started > s.started) continue;
    if (!mine || mine.run_id !== s.run_id) {
      // A run this page has not seen: show it only on a node that would have started it.
      if (!labelMatches(key, s.label)) continue;
      runs.set(key, { ...newRun(s), ...s, source: "snapshot" });
      touched(key);
      continue;
    }
    // Same run: the union of both curves (events may have arrived before the snapshot was made,
    // or the snapshot may be newer than the last event); the newer step count wins.
    const newer = s.step >= mine.step ? s : {};
    const pic = (s.preview_step || 0) > (mine.preview_step || 0) ? s : mine;
    const end = s.status !== "running" ? s : mine.status !== "running" ? { ...mine } : null;  // never un-finish
    Object.assign(mine, newer, { points: mergePoints(s.points, mine.points), preview: pic.preview,
                                 preview_step: pic.preview_step });
    if (end) Object.assign(mine, { status: end.status, lora_path: end.lora_path, message: end.message,
                                   seconds: end.seconds });
    touched(key);
  }
  for (const c of snap.class_images || []) {
    const key = String(c.node);
    const mine = classSets.get(key);
    if (!mine || (c.time || 0) >= (mine.time || 0)) classSets.set(key, c);
    touched(key);
  }
}

function labelMatches(nodeId, label) {
  const node = findNode(nodeId);
  if (!node) return true;  // the node may not be configured yet; it reads the store when shown
  const w = (node.widgets || []).find((x) => x.name === "save_name");
  return !w || !label || String(w.value).trim() === label;
}

let fetching = null;
async function refresh() {
  if (fetching) return fetching;
  fetching = (async () => {
    try {
      const resp = await api.fetchApi("/dreambooth/runs", { cache: "no-store" });
      if (resp.ok) applySnapshot(await resp.json());
    } catch (e) {
      console.warn("DreamBooth: could not read /dreambooth/runs", e);
    } finally {
      fetching = null;
    }
  })();
  return fetching;
}

function touched(nodeId) {
  lastEvent = Date.now();
  const key = String(nodeId);
  for (const v of views) if (viewKey(v) === key || viewKey(v) === lastSegment(key)) v.schedule();
}

// -- node lookup ------------------------------------------------------------------------------

const lastSegment = (id) => String(id).split(":").pop();
const viewKey = (v) => (v.node.graph && v.node.id != null ? String(v.node.id) : null);

function findNode(nodeId) {
  const graph = app.graph;
  if (!graph) return null;
  return graph.getNodeById?.(nodeId) ?? graph.getNodeById?.(Number(lastSegment(nodeId))) ?? null;
}

/** The state of a node: by its id, or for a node inside a subgraph by the last part of the
 *  execution id ("12:6"), which is all a panel knows about its place. */
function stateFor(map, node) {
  const key = String(node.id);
  if (map.has(key)) return map.get(key);
  if (node.graph && node.graph !== app.graph) {
    for (const [k, v] of map) if (k.includes(":") && lastSegment(k) === key) return v;
  }
  return null;
}

// -- formatting -------------------------------------------------------------------------------

function duration(sec) {
  if (sec == null || !Number.isFinite(sec)) return "–";
  sec = Math.max(0, Math.round(sec));
  const h = Math.floor(sec / 3600), m = Math.floor((sec % 3600) / 60), s = sec % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
}

function speed(sps) {
  if (!sps || !Number.isFinite(sps)) return "–";
  return sps >= 1 ? `${sps.toFixed(sps >= 10 ? 0 : 1)} s/step` : `${(1 / sps).toFixed(1)} steps/s`;
}

const num = (v) => (v == null || !Number.isFinite(v) ? "–" : v.toPrecision(3));

// -- panels -----------------------------------------------------------------------------------

function injectStyle() {
  if (document.getElementById("dreambooth-live-style")) return;
  const style = document.createElement("style");
  style.id = "dreambooth-live-style";
  style.textContent = `
.dreambooth-live { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; padding: 4px 6px;
  font: 11px/1.35 sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border-radius: 6px; overflow: hidden; }
.dreambooth-live .db-stats { display: flex; flex-wrap: wrap; gap: 2px 10px; }
.dreambooth-live .db-step { font-weight: bold; }
.dreambooth-live .db-row { display: flex; gap: 6px; flex: 1 1 auto; min-height: 0; }
.dreambooth-live canvas { flex: 1 1 auto; min-width: 0; width: 100%; height: 100%; }
.dreambooth-live .db-preview { flex: 0 0 auto; width: 96px; height: 96px; align-self: center; object-fit: contain;
  border-radius: 4px; background: #111; }
.dreambooth-live .db-preview[hidden] { display: none; }
.dreambooth-live .db-result { word-break: break-all; color: var(--descrip-text, #aaa); min-height: 1.35em; }
.dreambooth-live[data-status="completed"] .db-result { color: #8fd18f; }
.dreambooth-live[data-status="error"] .db-result, .dreambooth-live[data-status="interrupted"] .db-result { color: #ff9c8a; }
.dreambooth-classes { box-sizing: border-box; padding: 4px 6px; font: 11px/1.35 sans-serif;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); border-radius: 6px; }`;
  document.head.appendChild(style);
}

function el(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

function addView(node, kind, element, height, render) {
  const view = { node, kind, el: element, pending: false };
  view.render = () => render(view);
  view.schedule = () => {
    if (view.pending) return;
    view.pending = true;
    requestAnimationFrame(() => { view.pending = false; view.render(); node.setDirtyCanvas?.(true, false); });
  };
  const widget = node.addDOMWidget(`dreambooth_${kind}`, `dreambooth_${kind}`, element, {
    serialize: false, hideOnZoom: false, getMinHeight: () => height, getMaxHeight: () => height,
  });
  widget.serialize = false;  // not part of the workflow's widgets_values
  const removed = widget.onRemove;
  widget.onRemove = function () { views.delete(view); return removed?.apply(this, arguments); };
  views.add(view);
  view.widget = widget;
  return view;
}

function renderTrain(view) {
  const run = stateFor(runs, view.node);
  const p = view.parts;
  const ds = view.el.dataset;
  ds.nodeId = String(view.node.id);
  if (!run) {
    ds.status = "idle"; ds.step = "0"; ds.total = "0"; ds.points = "0";
    p.step.textContent = "not started";
    p.speed.textContent = p.eta.textContent = p.loss.textContent = "";
    p.result.textContent = "Queue the prompt to watch the training here.";
    p.preview.hidden = true;
    const steps = (view.node.widgets || []).find((w) => w.name === "steps");
    drawLossChart(p.canvas, [], Number(steps?.value) || 0, chartPixelRatio(), "no run yet");
    return;
  }
  Object.assign(ds, { status: run.status, step: String(run.step), total: String(run.total),
                      points: String(run.points.length), runId: run.run_id });
  p.step.textContent = `step ${run.step} / ${run.total}`;
  p.speed.textContent = speed(run.seconds_per_step);
  p.loss.textContent = `loss ${num(run.instance_loss)}` + (run.prior_loss != null ? ` · prior ${num(run.prior_loss)}` : "");
  if (run.status === "running") {
    p.eta.textContent = `${duration(run.eta_seconds)} left`;
    p.result.textContent = run.step ? "training…" : "preparing (caching latents)…";
  } else {
    p.eta.textContent = run.seconds != null ? `took ${duration(run.seconds)}` : "";
    p.result.textContent = run.status === "completed"
      ? `LoRA saved: ${run.lora_path || "?"}`
      : `${run.status}: ${run.message || ""}`;
  }
  p.result.title = p.result.textContent;
  if (run.preview) {
    if (p.preview.src !== run.preview) p.preview.src = run.preview;
    p.preview.title = `preview at step ${run.preview_step}`;
    p.preview.hidden = false;
  } else {
    p.preview.hidden = true;
  }
  drawLossChart(p.canvas, run.points, run.total, chartPixelRatio());
}

function chartPixelRatio() {
  const zoom = app.canvas?.ds?.scale || 1;
  return (window.devicePixelRatio || 1) * Math.max(1, zoom);
}

function attachTrainView(node) {
  injectStyle();
  const root = el("div", "dreambooth-live");
  const stats = el("div", "db-stats", root);
  const parts = {
    step: el("span", "db-step", stats), speed: el("span", "db-speed", stats), eta: el("span", "db-eta", stats),
    loss: el("span", "db-loss", stats),
  };
  const row = el("div", "db-row", root);
  parts.canvas = el("canvas", "db-chart", row);
  parts.preview = el("img", "db-preview", row);
  parts.preview.alt = "latest preview";
  parts.result = el("div", "db-result", root);
  const view = addView(node, "live", root, 230, renderTrain);
  view.parts = parts;
  // The canvas is laid out by the front end after the node is placed: redraw on size changes.
  new ResizeObserver(() => view.schedule()).observe(parts.canvas);
  view.schedule();
  return view;
}

function renderClasses(view) {
  const c = stateFor(classSets, view.node);
  const ds = view.el.dataset;
  ds.nodeId = String(view.node.id);
  if (!c) {
    Object.assign(ds, { generated: "", reused: "" });
    view.el.textContent = "Class images: not run yet";
    return;
  }
  Object.assign(ds, { generated: String(c.generated), reused: String(c.reused), count: String(c.count) });
  const head = c.done < c.count ? `${c.done} / ${c.count} class images` : `${c.count} class images`;
  view.el.textContent = `${head}: ${c.reused} reused from the cache, ${c.generated} generated`;
  view.el.title = c.folder || "";
}

function attachClassView(node) {
  injectStyle();
  const root = el("div", "dreambooth-classes");
  const view = addView(node, "classes", root, 44, renderClasses);
  // The node's own output (also in the history) carries the counts: use it when no event came.
  const executed = node.onExecuted;
  node.onExecuted = function (message) {
    executed?.apply(this, arguments);
    if (message?.generated && message?.reused && !classSets.has(String(node.id))) {
      const g = Number(message.generated[0]), r = Number(message.reused[0]);
      classSets.set(String(node.id), { node: String(node.id), count: g + r, done: g + r, generated: g, reused: r });
      view.schedule();
    }
  };
  view.schedule();
  return view;
}

/** Make the node tall enough for its panel (workflows saved without it keep their old size). */
function fitNode(node) {
  const need = node.computeSize?.();
  if (!need) return;
  const w = Math.max(node.size[0], need[0]), h = Math.max(node.size[1], need[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
}

// -- test / debugging hook ------------------------------------------------------------------------

function summary(nodeId) {
  const run = runs.get(String(nodeId));
  const view = [...views].find((v) => viewKey(v) === String(nodeId));
  const dom = view ? { ...view.el.dataset, text: view.el.innerText } : null;
  if (!run) return { node: String(nodeId), status: "idle", dom };
  return {
    node: run.node, run_id: run.run_id, status: run.status, step: run.step, total: run.total,
    points: run.points.length, last_point: run.points[run.points.length - 1] || null,
    has_prior: run.points.some((p) => p[3] != null), preview: !!run.preview, lora_path: run.lora_path,
    source: run.source, dom,
  };
}

window.DreamBoothLive = {
  state: summary,
  classImages: (nodeId) => classSets.get(String(nodeId)) ?? null,
  refresh,
  lastEventAge: () => (lastEvent ? Date.now() - lastEvent : null),
};

// -- registration -------------------------------------------------------------------------------

app.registerExtension({
  name: "dreambooth.live",
  async setup() {
    api.addEventListener("dreambooth.train.start", onStart);
    api.addEventListener("dreambooth.train.step", onStep);
    api.addEventListener("dreambooth.train.preview", onPreview);
    api.addEventListener("dreambooth.train.done", onDone);
    api.addEventListener("dreambooth.class_images", onClassImages);
    api.addEventListener("reconnected", () => refresh());
    setInterval(() => {
      const running = [...runs.values()].some((r) => r.status === "running");
      if (running && Date.now() - lastEvent > STALE_MS) refresh();
    }, POLL_MS);
    await refresh();
  },
  async nodeCreated(node) {
    const cls = node.comfyClass || node.constructor?.comfyClass;
    if (cls === TRAIN) attachTrainView(node);
    else if (cls === CLASS_IMAGES) attachClassView(node);
    else return;
    fitNode(node);
  },
  loadedGraphNode(node) {
    const cls = node.comfyClass || node.constructor?.comfyClass;
    if (cls !== TRAIN && cls !== CLASS_IMAGES) return;
    fitNode(node);
    for (const v of views) if (v.node === node) v.schedule();
  },
  async afterConfigureGraph() {
    // A workflow was loaded or restored (page reload): runs of its nodes may be in progress.
    await refresh();
    for (const v of views) v.schedule();
  },
});
