// LoRA Lab frontend.
// - Train LoRA: the settings the guide calls essential stay in view and the rest fold away ("More
//   settings"); a training panel (a DOM widget that reserves its own height, so it never paints over
//   other widgets) right under them: status (with "saving", "sampling", "validating" between steps),
//   step / total, s/step, the time left counting saves and samples, the plan line (what every
//   setting left at 0 becomes, before Queue), the loss curve (per step and smoothed) with the
//   validation loss, learning rate and checkpoints, the newest samples (only when there are some), and
//   the run's message (how to resume after a Cancel; at the end the diagnosis and the checkpoint to
//   use). Live from websocket events; the whole history comes from the server's /lora_lab/run route,
//   so a reloaded page or a second browser shows the same curve. A background run shows a Stop button.
// - Sample Checkpoint and Compare LoRA Stack: the cell being sampled (k of n, with its picture), then
//   the grid as cells with text labels sized to read on the node (cells never under 128 px: the node
//   widens for many columns); a click opens a cell full size.
// - Load Dataset, Caption and Apply LoRA Stack: their report, captions and what was applied as text.
// - Workflows saved by older versions load with every value in its widget (widget_history.json).
// Works for nodes inside subgraphs (execution ids like "5:3"), in the classic canvas and in Nodes 2.0.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "LoraLabTrainLora";
// The grid nodes, and what their cell view says before the first Queue.
const GRID_NODES = {
  LoraLabSampleCheckpoint: "Queue to sample: one cell per checkpoint, prompt and strength, the same seed in each.",
  LoraLabCompareLoraStack: "Queue to sample: one cell per pair of strengths of the stack's first two LoRAs (the "
                           + "base and each alone included), the same seed in each.",
};
const DATASET_NODE = "LoraLabLoadDataset";
const TEXT_NODES = { LoraLabLoadDataset: "Queue to see how this dataset measures up to the guide (this node alone "
                                         + "is enough: it is an output node).",
                     LoraLabCaption: "Run the workflow to see every caption.",
                     LoraLabApplyLoraStack: "Queue to see which LoRAs are applied, at which strengths." };
// The doctor's report is a few findings of two or three lines each: room for a typical one unscrolled.
const TEXT_HEIGHTS = { LoraLabLoadDataset: 200, LoraLabCaption: 150, LoraLabApplyLoraStack: 96 };
const PANEL_HEIGHT = 330; // without samples
const SAMPLE_HEIGHT = 110;
const MULTILINE_HEIGHT = 96;
const CELL_HEIGHT = 104;
const runs = new Map(); // execution id -> the run state shown by that node's panel

// --- workflows saved by older versions ----------------------------------------------------------
// Workflow files store widget values by position. widget_history.json lists every widget layout each
// LoRA Lab node has had; a node saved with an older one is read by name and laid out anew, inputs
// added since then taking the value that keeps the old behaviour, removed ones dropped. The layout a
// node was saved with is kept in its properties (lora_lab_layout); files from before that are
// recognised by their number of values and where the "control after generate" values sit (there, and
// nowhere else).
const CONTROL_VALUES = new Set(["fixed", "increment", "decrement", "randomize"]);
const history = fetch(new URL("./widget_history.json", import.meta.url)).then((r) => r.json())
  .then((data) => data.nodes).catch((error) => { console.warn("LoRA Lab: no widget history", error); return {}; });
let widgetHistory = {};
history.then((nodes) => { widgetHistory = nodes; });

function savedLayout(entry, values, saved) {
  if (Number.isInteger(saved) && entry.layouts[saved - 1]) return saved;
  for (let index = entry.layouts.length; index >= 1; index--) {
    const widgets = entry.layouts[index - 1].widgets;
    if (widgets.length === values.length &&
        widgets.every((name, i) => name.endsWith("#control") === CONTROL_VALUES.has(values[i]))) return index;
  }
  return null;
}

function migrateWidgetValues(type, info) {
  const entry = widgetHistory[type];
  const values = info?.widgets_values;
  if (!entry || !Array.isArray(values)) return;
  const current = entry.layouts.length;
  const layout = savedLayout(entry, values, info.properties?.lora_lab_layout);
  info.properties = { ...(info.properties ?? {}), lora_lab_layout: current };
  if (layout === null) {
    console.warn(`LoRA Lab: ${type} has ${values.length} widget values, which match none of its layouts`);
    return;
  }
  if (layout === current) return;
  const named = Object.fromEntries(entry.layouts[layout - 1].widgets.map((name, i) => [name, values[i]]));
  const dropped = entry.removed.filter((name) => name in named);
  if (dropped.length) console.info(`LoRA Lab: ${type} from an older workflow: ignored ${dropped.join(", ")}`);
  info.widgets_values = entry.layouts[current - 1].widgets.map((name) => name in named ? named[name]
    : name.endsWith("#control") ? "fixed" : entry.added[name]);
}

// --- nodes and execution ids -------------------------------------------------------------------
// A node property changed by code is not a change the frontend notices by itself; without this the
// autosaved workflow (what a page reload restores) would miss it until the user next touches the graph.
function saveWorkflowState() {
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

function rootGraph() {
  return app.graph?.rootGraph ?? app.graph;
}

function nodeForExecutionId(id) {
  let graph = rootGraph();
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(Number(part)) ?? graph?.getNodeById?.(part) ?? null; // ids are numbers or strings
    graph = node?.subgraph;
  }
  return node;
}

function executionIdOf(node) {
  const root = rootGraph();
  if (!node.graph || node.graph === root) return String(node.id);
  const path = findSubgraphPath(root, node.graph);
  return path ? [...path, node.id].join(":") : String(node.id);
}

function findSubgraphPath(graph, target) {
  for (const candidate of graph?._nodes ?? graph?.nodes ?? []) {
    if (!candidate.subgraph) continue;
    if (candidate.subgraph === target) return [candidate.id];
    const deeper = findSubgraphPath(candidate.subgraph, target);
    if (deeper) return [candidate.id, ...deeper];
  }
  return null;
}

function allNodes(graph = rootGraph(), found = []) {
  for (const node of graph?._nodes ?? graph?.nodes ?? []) {
    found.push(node);
    if (node.subgraph) allNodes(node.subgraph, found);
  }
  return found;
}

// --- run state ---------------------------------------------------------------------------------
function freshRun(name) {
  return { name, status: "training", message: "", step: 0, total: 0, secondsPerStep: null, losses: [],
           checkpoints: [], validation: [], sample: null, best: null, background: false, phase: null, eta: null };
}

const ACTIVE_JOB = new Set(["starting", "training", "paused", "stopping"]);

function runFor(id, name) {
  let run = runs.get(id);
  if (!run || (name && run.name !== name)) {
    run = freshRun(name);
    runs.set(id, run);
  }
  return run;
}

function addLoss(run, step, loss, lr) {
  const last = run.losses.at(-1);
  if (!last || step > last[0]) run.losses.push([step, loss, lr]);
}

function mergeLosses(run, rows) {
  const byStep = new Map([...rows, ...run.losses].map((row) => [row[0], row]));
  run.losses = [...byStep.values()].sort((a, b) => a[0] - b[0]);
}

function hasGap(run) {
  return run.losses.some((row, i) => i > 0 && row[0] !== run.losses[i - 1][0] + 1) ||
    (run.losses.length > 0 && run.losses[0][0] !== 1 && run.status === "training");
}

// Steps missed while the page was away (a reload, a dropped socket) come from the run folder; its
// files are rewritten about once a second, so a gap is filled by asking again a moment later.
const refetching = new Set();
function refetchSoon(node) {
  if (refetching.has(node)) return;
  refetching.add(node);
  setTimeout(() => { refetching.delete(node); loadHistory(node); }, 1500);
}

async function loadHistory(node, name = null) {
  const id = executionIdOf(node);
  const query = name ? `name=${encodeURIComponent(name)}` : `node=${encodeURIComponent(id)}`;
  try {
    const response = await api.fetchApi(`/lora_lab/run?${query}`, { cache: "no-store" });
    if (!response.ok) return;
    const { run: saved, losses, sample, job } = await response.json();
    if (!saved) return; // this node has not trained yet
    const run = runFor(id, saved.name);
    run.background = Boolean(saved.owner?.background);
    mergeLosses(run, losses);
    run.validation = mergePoints(run.validation, saved.validation ?? []);
    run.sample = run.sample ?? sample;
    run.best = saved.best ?? run.best;
    Object.assign(run, { status: run.step > saved.step ? run.status : saved.status,
                         message: run.step > saved.step ? run.message : saved.message,
                         step: Math.max(run.step, saved.step), total: saved.total_steps,
                         secondsPerStep: run.secondsPerStep ?? saved.seconds_per_step,
                         checkpoints: mergeCheckpoints(run.checkpoints, saved.checkpoints) });
    if (job && ACTIVE_JOB.has(job.status)) Object.assign(run, { status: job.status, message: job.message });
    renderNode(node);
    if (hasGap(run)) refetchSoon(node);
  } catch (error) {
    console.warn("LoRA Lab: could not read the run's history", error);
  }
}

function mergePoints(mine, saved) {
  const byStep = new Map([...saved, ...mine].map((point) => [point[0], point]));
  return [...byStep.values()].sort((a, b) => a[0] - b[0]);
}

function mergeCheckpoints(mine, saved) {
  const steps = new Map([...saved, ...mine].map((c) => [c.step, c]));
  return [...steps.values()].sort((a, b) => a.step - b.step);
}

function onRunEvent(type, detail) {
  const run = runFor(String(detail.node), detail.run);
  if (type === "progress") {
    addLoss(run, detail.step, detail.loss, detail.lr);
    Object.assign(run, { step: detail.step, total: detail.total, status: "training", message: "", phase: null,
                         eta: detail.eta ?? null });
    run.secondsPerStep = run.secondsPerStep == null ? detail.seconds_per_step
      : 0.8 * run.secondsPerStep + 0.2 * detail.seconds_per_step;
  } else if (type === "checkpoint") {
    run.checkpoints = mergeCheckpoints(run.checkpoints, [{ step: detail.step, file: detail.file }]);
  } else if (type === "validation") {
    run.validation = mergePoints(run.validation, [[detail.step, detail.loss]]);
  } else if (type === "sample") {
    run.sample = detail.image;
  } else if (type === "phase") {
    run.phase = detail.phase;
  } else if (type === "start") {
    Object.assign(run, { step: detail.first_step - 1, total: detail.total, status: "training" });
    run.checkpoints = mergeCheckpoints(run.checkpoints, detail.checkpoints ?? []);
  } else if (type === "status") {
    Object.assign(run, { status: detail.status, message: detail.message ?? "" });
    if (detail.background) run.background = true;
  }
  const node = nodeForExecutionId(detail.node);
  if (!node) return;
  renderNode(node);
  // A run this panel has not followed (handed on from disk, resumed, or stopped earlier): its curve
  // is in its folder (asked for only once the run has one).
  const ended = type === "status" && ["finished", "stopped"].includes(detail.status) && run.losses.length === 0;
  if (type === "start" || ended) loadHistory(node, detail.run);
  if (type === "progress" && hasGap(run)) refetchSoon(node);
}

api.addEventListener("lora_lab.start", ({ detail }) => onRunEvent("start", detail));
api.addEventListener("lora_lab.phase", ({ detail }) => onRunEvent("phase", detail));
api.addEventListener("lora_lab.progress", ({ detail }) => onRunEvent("progress", detail));
api.addEventListener("lora_lab.checkpoint", ({ detail }) => onRunEvent("checkpoint", detail));
api.addEventListener("lora_lab.status", ({ detail }) => onRunEvent("status", detail));
api.addEventListener("lora_lab.validation", ({ detail }) => onRunEvent("validation", detail));
api.addEventListener("lora_lab.sample", ({ detail }) => onRunEvent("sample", detail));
api.addEventListener("reconnected", () => {
  for (const node of allNodes()) if (node.comfyClass === TRAIN_NODE) loadHistory(node);
});

// --- the panel ---------------------------------------------------------------------------------
const STATUS_COLOURS = { training: "#4a9eff", starting: "#4a9eff", paused: "#a371f7", stopping: "#d29922",
                         finished: "#3fb950", stopped: "#d29922", failed: "#f85149" };

async function stopJob(node) {
  const run = runs.get(executionIdOf(node));
  if (!run) return;
  try {
    const response = await api.fetchApi("/lora_lab/jobs/stop", { method: "POST", body: JSON.stringify({ name: run.name }),
                                                                 headers: { "Content-Type": "application/json" } });
    const answer = await response.json();
    Object.assign(run, response.ok ? { status: "stopping", message: "Stopping: saving a checkpoint ..." }
                                    : { message: answer.error ?? "Could not stop the run." });
  } catch (error) {
    run.message = `Could not stop the run: ${error}`;
  }
  renderNode(node);
}

function element(tag, style, parent) {
  const made = document.createElement(tag);
  Object.assign(made.style, style);
  parent?.append(made);
  return made;
}

function makePanel() {
  const root = element("div", { display: "flex", flexDirection: "column", gap: "4px", boxSizing: "border-box",
                                height: "100%", padding: "6px 8px", overflow: "hidden",
                                font: "12px sans-serif", color: "var(--input-text, #ddd)",
                                background: "var(--comfy-input-bg, #222)", borderRadius: "6px" });
  root.className = "lora-lab-panel";
  const header = element("div", { display: "flex", alignItems: "center", gap: "8px", flexWrap: "wrap" }, root);
  const status = element("span", { padding: "1px 8px", borderRadius: "9px", color: "#111", fontWeight: "bold" },
                         header);
  status.className = "lora-lab-status";
  const numbers = element("span", { whiteSpace: "normal", flex: "1 1 auto" }, header);
  numbers.className = "lora-lab-numbers";
  const button = (text, title, className) => {
    const made = element("button", { padding: "1px 10px", cursor: "pointer", font: "12px sans-serif" }, header);
    Object.assign(made, { textContent: text, title, className });
    return made;
  };
  const more = button("More settings", "Show or hide the settings the guide does not call essential (they keep " +
                      "their values either way).", "lora-lab-more");
  const stop = button("Stop", "Stop this background run; it saves a checkpoint that resume = latest continues.",
                      "lora-lab-stop");
  stop.style.display = "none";
  const plan = element("div", { whiteSpace: "normal", color: "var(--descrip-text, #aaa)", flex: "0 0 auto" }, root);
  plan.className = "lora-lab-plan";
  const chart = element("canvas", { width: "100%", height: "170px", flex: "0 0 170px" }, root);
  chart.className = "lora-lab-chart";
  const sample = element("img", { height: `${SAMPLE_HEIGHT}px`, flex: `0 0 ${SAMPLE_HEIGHT}px`, objectFit: "contain",
                                  objectPosition: "left", display: "none", imageRendering: "pixelated" }, root);
  sample.className = "lora-lab-sample";
  sample.alt = "samples at strength 1";
  const message = element("div", { whiteSpace: "normal", overflowWrap: "anywhere", overflowY: "auto",
                                   flex: "1 1 auto", minHeight: "0" }, root);
  message.className = "lora-lab-message";
  return { root, status, numbers, more, stop, plan, chart, sample, message };
}

function duration(seconds) {
  if (!isFinite(seconds)) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

const PHASES = { saving: "saving…", sampling: "sampling…", validating: "validating…" };

function panelHeight(node) {
  return PANEL_HEIGHT + (node.loraLabPanel?.hasSample ? SAMPLE_HEIGHT + 4 : 0);
}

// The node's height follows what it shows: the folded settings and the samples come and go.
function fitNode(node) {
  if (!node.graph) return;
  const height = node.computeSize()[1] + 6;  // a little room under the last widget, as the frontend leaves
  if (Math.abs(node.size[1] - height) > 1) node.setSize([node.size[0], height]);
  node.setDirtyCanvas?.(true, true);
}

function renderNode(node) {
  const parts = node.loraLabPanel;
  if (!parts) return;
  const folded = foldedCount(node);
  parts.more.textContent = node.showAdvanced ? "Fewer settings" : `More settings (${folded})`;
  parts.more.style.display = folded ? "inline-block" : "none";
  const run = runs.get(executionIdOf(node));
  const hadSample = parts.hasSample;
  parts.hasSample = Boolean(run?.sample);
  if (parts.hasSample !== hadSample) fitNode(node);
  parts.sample.style.display = parts.hasSample ? "block" : "none";
  if (!run) {
    parts.status.textContent = parts.status.dataset.status = "no run yet";
    parts.status.style.background = "#888";
    parts.numbers.textContent = "";
    parts.message.textContent = "Queue the workflow to train. Progress, the loss curve and how to continue " +
      "after a Cancel appear here.";
    drawChart(parts.chart, null);
    parts.stop.style.display = "none";
    return;
  }
  parts.stop.style.display = run.background && ACTIVE_JOB.has(run.status) ? "inline-block" : "none";
  parts.stop.disabled = run.status === "stopping";
  if (run.sample && parts.sample.src !== run.sample) parts.sample.src = run.sample;
  const training = run.status === "training";
  parts.status.textContent = training && run.phase ? PHASES[run.phase] ?? run.phase : run.status;
  parts.status.dataset.status = run.status;  // the state behind the words shown (for tests and styles)
  parts.status.style.background = STATUS_COLOURS[run.status] ?? "#888";
  const last = run.losses.at(-1);
  const speed = run.secondsPerStep ? ` · ${run.secondsPerStep.toFixed(2)} s/step` : "";
  // The time left is the server's: it counts the saves, validation and samples still to come.
  const eta = training && run.eta != null ? ` · ${duration(run.eta)} left` : "";
  parts.numbers.textContent = `${run.name} · step ${run.step} / ${run.total || "?"}` +
    (last ? ` · loss ${last[1].toFixed(4)}` : "") + speed + eta;
  const saved = run.checkpoints.length
    ? `Saved: ${run.checkpoints.map((c) => c.file ?? `step ${c.step}`).join(", ")}` : "";
  const background = run.background && ACTIVE_JOB.has(run.status)
    ? "Training in the background: the queue is free. Queue again after a checkpoint is saved to sample or " +
      "stack it. " : "";
  parts.message.textContent = run.message || background + saved;
  drawChart(parts.chart, run);
  node.setDirtyCanvas?.(true, false);
}

// --- the plan line: what the settings left at 0 become, before Queue ----------------------------
function upstreamDataset(node, seen = new Set()) {
  // Through Caption (or any node with a dataset input) to the Load Dataset that made the dataset.
  if (!node?.graph || seen.has(node)) return null;  // a node being removed has no graph to look in
  seen.add(node);
  if (node.comfyClass === DATASET_NODE) {  // what its last run measured, else what its widgets say
    const type = node.widgets?.find((w) => w.name === "lora_type")?.value;
    return node.properties?.lora_lab_dataset ?? (type ? { lora_type: type } : null);
  }
  const slot = (node.inputs ?? []).findIndex((input) => input.name === "dataset");
  return slot < 0 ? null : upstreamDataset(node.getInputNode?.(slot), seen);
}

function widgetValues(node) {
  return Object.fromEntries((node.widgets ?? []).filter((w) => w.serialize !== false && w.name)
    .map((w) => [w.name, w.value]));
}

const planTimers = new Map();
function requestPlan(node) {
  if (!node.loraLabPanel) return;
  clearTimeout(planTimers.get(node));
  planTimers.set(node, setTimeout(async () => {
    if (!node.graph) return;
    const dataset = upstreamDataset(node) ?? {};
    const body = { settings: JSON.stringify(widgetValues(node)), lora_type: dataset.lora_type ?? "",
                   family: dataset.family ?? "", images: dataset.images ?? "" };
    try {
      const response = await api.fetchApi("/lora_lab/plan", { method: "POST", body: JSON.stringify(body),
                                                               headers: { "Content-Type": "application/json" } });
      const answer = await response.json();
      node.loraLabPanel.plan.textContent = answer.plan ? `Plan: ${answer.plan}.` : "";
      node.loraLabPanel.plan.title = dataset.images ? "" : "Queue the workflow (or just Load Dataset) once to see " +
        "the number of steps for your images.";
    } catch (error) {
      console.warn("LoRA Lab: could not work out the plan", error);
    }
  }, 250));
}

function watchWidgets(node, changed) {
  for (const widget of node.widgets ?? []) {
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      changed();
      return result;
    };
  }
}

function requestAllPlans() {
  for (const node of allNodes()) if (node.comfyClass === TRAIN_NODE) requestPlan(node);
}

// Folding: the node definition marks the settings to fold ("advanced"). Nodes 2.0 folds them itself.
// The canvas of every release measured (1.27.10, 1.49.6, 1.58.1) skips drawing advanced widgets but
// keeps their rows, so there a folded widget is hidden as well, and where even hidden widgets keep
// their rows (1.27, no getLayoutWidgets) made zero height.
function foldSettings(node, nodeData) {
  const specs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
  for (const widget of node.widgets ?? []) {
    if (specs[widget.name]?.[1]?.advanced) widget.loraLabFolded = true;
  }
  applyFolding(node);
}

function applyFolding(node) {
  const shown = Boolean(node.showAdvanced);
  for (const widget of node.widgets ?? []) {
    if (!widget.loraLabFolded) continue;
    widget.advanced = true;
    // Nodes 2.0 folds advanced widgets itself; the canvas of every release still lays them out.
    if (window.LiteGraph?.vueNodesMode) {
      if (widget.loraLabHidden) widget.hidden = widget.loraLabHidden = false;
      continue;
    }
    widget.hidden = widget.loraLabHidden = !shown;
    if (typeof node.getLayoutWidgets === "function") continue;
    if (!("loraLabComputeSize" in widget)) widget.loraLabComputeSize = widget.computeSize;
    widget.computeSize = shown ? widget.loraLabComputeSize : () => [0, -4];
  }
}

function foldedCount(node) {
  return (node.widgets ?? []).filter((widget) => widget.loraLabFolded).length;
}

function toggleSettings(node) {
  node.showAdvanced = !node.showAdvanced;
  applyFolding(node);
  fitNode(node);
  renderNode(node);
  saveWorkflowState();
}

function movingAverage(values, window) {
  let total = 0;
  return values.map((value, index) => {
    total += value;
    if (index >= window) total -= values[index - window];
    return total / Math.min(index + 1, window);
  });
}

function drawChart(canvas, run) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth || 300);
  const height = 170;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#999";
  const left = 48, right = 40, top = 8, bottom = 28;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  ctx.strokeStyle = "#555";
  ctx.strokeRect(left, top, plotWidth, plotHeight);
  ctx.save();
  ctx.translate(10, top + plotHeight / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("loss", 0, 0);
  ctx.restore();
  ctx.textAlign = "center";
  ctx.fillText("step", left + plotWidth / 2, height - 4);
  canvas.dataset.points = String(run?.losses.length ?? 0); // what the chart shows, for tests
  canvas.dataset.first = String(run?.losses[0]?.[0] ?? "");
  canvas.dataset.last = String(run?.losses.at(-1)?.[0] ?? "");
  if (!run || run.losses.length === 0) {
    ctx.fillText("no steps yet", left + plotWidth / 2, top + plotHeight / 2);
    return;
  }
  const steps = run.losses.map((row) => row[0]);
  const values = run.losses.map((row) => row[1]);
  const rates = run.losses.map((row) => row[2]);
  const first = steps[0], lastStep = Math.max(run.total || 0, steps.at(-1), first + 1);
  const shown = values.concat(run.validation.map((point) => point[1]));
  const low = Math.min(...shown), high = Math.max(...shown);
  const span = high - low || Math.abs(high) || 1;
  const x = (step) => left + ((step - first) / (lastStep - first || 1)) * plotWidth;
  const y = (value) => top + (1 - (value - low) / span) * plotHeight;
  ctx.textAlign = "right";
  for (const value of [high, (high + low) / 2, low]) ctx.fillText(value.toPrecision(3), left - 4, y(value) + 4);
  ctx.textAlign = "center";
  ctx.fillText(String(first), left, top + plotHeight + 13);
  ctx.fillText(String(lastStep), left + plotWidth, top + plotHeight + 13);
  ctx.setLineDash([2, 3]);
  ctx.strokeStyle = "#888";
  for (const checkpoint of run.checkpoints) {
    ctx.beginPath();
    ctx.moveTo(x(checkpoint.step), top);
    ctx.lineTo(x(checkpoint.step), top + plotHeight);
    ctx.stroke();
  }
  ctx.setLineDash([]);
  const line = (points, colour, lineWidth) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
    ctx.stroke();
  };
  const maxRate = Math.max(...rates);
  if (maxRate > 0) {
    line(steps.map((s, i) => [x(s), top + (1 - rates[i] / maxRate) * plotHeight]), "rgba(230,85,13,0.6)", 1);
    ctx.fillStyle = "#e6550d";
    ctx.textAlign = "left";
    ctx.fillText(`lr ${maxRate.toExponential(0)}`, left + plotWidth + 3, top + 10);
  }
  line(steps.map((s, i) => [x(s), y(values[i])]), "rgba(158,202,225,0.8)", 1);
  const smooth = movingAverage(values, Math.max(3, Math.floor(values.length / 20)));
  line(steps.map((s, i) => [x(s), y(smooth[i])]), "#2b7bd6", 2);
  if (run.validation.length) { // held-out images: the curve that shows overfitting
    const points = run.validation.map(([step, loss]) => [x(step), y(loss)]);
    line(points, "#3fb950", 2);
    ctx.fillStyle = "#3fb950";
    for (const [px, py] of points) ctx.fillRect(px - 2, py - 2, 4, 4);
    ctx.textAlign = "left";
    ctx.fillText("validation", left + 4, top + 10);
  }
}

function addPanel(node) {
  if (node.loraLabPanel) return;
  const parts = makePanel();
  const widget = node.addDOMWidget("lora_lab_panel", "lora_lab_panel", parts.root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => panelHeight(node), getMaxHeight: () => panelHeight(node),
  });
  widget.serialize = false; // not part of the workflow's widget values: they are positional
  node.loraLabPanel = parts;
  parts.stop.addEventListener("click", (event) => { event.stopPropagation(); stopJob(node); });
  parts.more.addEventListener("click", (event) => { event.stopPropagation(); toggleSettings(node); });
  new ResizeObserver(() => renderNode(node)).observe(parts.root);
  renderNode(node);
}

// --- the grid nodes: the cell being made ---------------------------------------------------------
function addCellView(node, placeholder) {
  if (node.loraLabCells) return;
  const root = element("div", { display: "flex", gap: "8px", alignItems: "center", boxSizing: "border-box",
                                height: `${CELL_HEIGHT - 8}px`, padding: "4px 8px", font: "12px sans-serif",
                                color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
                                borderRadius: "6px", overflow: "hidden" });
  root.className = "lora-lab-cells";
  const image = element("img", { width: "88px", height: "88px", objectFit: "contain", flex: "0 0 88px",
                                 display: "none", imageRendering: "pixelated" }, root);
  const text = element("div", { whiteSpace: "normal", overflowWrap: "anywhere" }, root);
  text.textContent = placeholder;
  const widget = node.addDOMWidget("lora_lab_cells", "lora_lab_cells", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => CELL_HEIGHT, getMaxHeight: () => CELL_HEIGHT,
  });
  widget.serialize = false;
  node.loraLabCells = { image, text };
}

api.addEventListener("lora_lab.cell", ({ detail }) => {
  const cells = nodeForExecutionId(detail.node)?.loraLabCells;
  if (!cells) return;
  cells.image.src = detail.image;
  cells.image.style.display = "block";
  cells.text.textContent = detail.done === detail.total
    ? `All ${detail.total} cells sampled; the grid is below (click a cell to see it full size). Last: ${detail.label}`
    : `Cell ${detail.done} of ${detail.total}: ${detail.label}`;
});

// --- the grid nodes: the grid, as cells with text labels ---------------------------------------
// The grid picture (the node's grid output) shrunk into a node has labels too small to read; here the
// cells are laid out at the node's width and the labels are text, so both read at the zoom a user
// works at. A click on a cell opens it full size.
const GRID_LABEL_WIDTH = 150;
const GRID_GAP = 4;
const GRID_FONT = 15;
const GRID_LINE = Math.ceil(GRID_FONT * 1.25);
const GRID_MIN_CELL = 128; // a cell smaller than this on the node at zoom 1 does not read
const GRID_MARGIN = 20; // the frontend's margin around a DOM widget, both sides together
const GRID_PADDING = 4;

function gridCell(node) {
  const grid = node.loraLabGrid?.data;
  if (!grid) return 0;
  const room = node.size[0] - GRID_MARGIN - 2 * GRID_PADDING - GRID_LABEL_WIDTH - GRID_GAP * grid.columns.length;
  return Math.max(GRID_MIN_CELL, Math.floor(room / grid.columns.length));
}

// A grid of many columns widens its node rather than shrink its cells below GRID_MIN_CELL.
function widenForGrid(node) {
  const columns = node.loraLabGrid?.data?.columns.length;
  if (!columns) return;
  const needed = GRID_MARGIN + 2 * GRID_PADDING + GRID_LABEL_WIDTH + columns * (GRID_MIN_CELL + GRID_GAP);
  if (node.size[0] < needed) node.setSize([needed, node.size[1]]);
}

// How many lines a label takes at `width` (words wrap as the browser wraps them, near enough), so
// the grid's height holds every label whole.
let measure = null;
function labelLines(text, width) {
  measure ??= document.createElement("canvas").getContext("2d");
  measure.font = `${GRID_FONT}px sans-serif`;
  let lines = 0;
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    lines += 1;
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (line && measure.measureText(candidate).width > width) {
        lines += 1;
        line = word;
      } else {
        line = candidate;
      }
      lines += Math.floor(measure.measureText(line).width / width);  // a word longer than the width breaks
    }
  }
  return lines;
}

function gridHeight(node) {
  const grid = node.loraLabGrid?.data;
  if (!grid) return 0;
  const cell = gridCell(node);
  const header = Math.max(labelLines(grid.corner ?? "", GRID_LABEL_WIDTH),
                          ...grid.columns.map((column) => labelLines(column, cell)));
  const rows = grid.rows.reduce((sum, row) => sum + GRID_GAP
                                + Math.max(cell, labelLines(row.label, GRID_LABEL_WIDTH) * GRID_LINE), 0);
  return GRID_MARGIN + 2 * GRID_PADDING + header * GRID_LINE + rows;
}

function viewUrl(ref) {
  const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  return api.apiURL(`/view?${query}`);
}

function openFullSize(src, caption) {
  const overlay = element("div", { position: "fixed", inset: "0", zIndex: "10000", background: "rgba(0,0,0,0.85)",
                                   display: "flex", flexDirection: "column", alignItems: "center",
                                   justifyContent: "center", gap: "8px", cursor: "zoom-out",
                                   font: "15px sans-serif", color: "#eee" }, document.body);
  overlay.className = "lora-lab-full-size";
  // As large as the screen allows (a 512 px sample is shown whole, a small one enlarged).
  const picture = element("img", { width: "92vw", height: "86vh", objectFit: "contain" }, overlay);
  picture.src = src;
  element("div", { whiteSpace: "pre-wrap", textAlign: "center" }, overlay).textContent = caption;
  const close = () => { overlay.remove(); document.removeEventListener("keydown", onKey); };
  const onKey = (event) => { if (event.key === "Escape") close(); };
  overlay.addEventListener("click", close);
  document.addEventListener("keydown", onKey);
}

function renderGrid(node) {
  const view = node.loraLabGrid;
  const grid = view?.data;
  if (!grid) return;
  widenForGrid(node);
  const cell = gridCell(node);
  view.root.replaceChildren();
  view.root.style.display = "grid";
  view.root.style.gridTemplateColumns = `${GRID_LABEL_WIDTH}px repeat(${grid.columns.length}, ${cell}px)`;
  const label = (text, style = {}) => {
    const made = element("div", { whiteSpace: "pre-wrap", overflowWrap: "anywhere",
                                  font: `${GRID_FONT}px/${GRID_LINE}px sans-serif`, ...style }, view.root);
    made.textContent = text;
    return made;
  };
  label(grid.corner ?? "", { alignSelf: "end", opacity: "0.8" }).className = "lora-lab-grid-corner";
  for (const column of grid.columns) label(column, { textAlign: "center", alignSelf: "end" });
  for (const row of grid.rows) {
    label(row.label, { alignSelf: "center" }).className = "lora-lab-grid-label";
    row.cells.forEach((ref, index) => {
      const image = element("img", { width: `${cell}px`, height: `${cell}px`, objectFit: "contain",
                                     cursor: "zoom-in", background: "#111" }, view.root);
      image.className = "lora-lab-grid-cell";
      image.src = viewUrl(ref);
      const caption = `${row.label.replace(/\n/g, " · ")} · ${grid.columns[index]}`;
      image.title = caption;
      image.addEventListener("click", (event) => { event.stopPropagation(); openFullSize(image.src, caption); });
    });
  }
  fitNode(node);
}

function addGridView(node) {
  if (node.loraLabGrid) return;
  const root = element("div", { display: "none", gap: `${GRID_GAP}px`, boxSizing: "border-box",
                                padding: `${GRID_PADDING}px`,
                                color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
                                borderRadius: "6px", overflow: "hidden", alignItems: "center" });
  root.className = "lora-lab-grid";
  const widget = node.addDOMWidget("lora_lab_grid", "lora_lab_grid", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => gridHeight(node), getMaxHeight: () => gridHeight(node),
  });
  widget.serialize = false;
  node.loraLabGrid = { root, data: null, width: 0 };
  new ResizeObserver(() => {  // a wider node, larger cells
    if (node.loraLabGrid.data && Math.abs(node.loraLabGrid.width - node.size[0]) > 2) {
      node.loraLabGrid.width = node.size[0];
      renderGrid(node);
    }
  }).observe(root);
}

// --- text on Load Dataset, Caption and Apply LoRA Stack ---------------------------------------
function addTextPanel(node, placeholder, height) {
  if (node.loraLabText) return;
  const box = element("div", { boxSizing: "border-box", height: `${height - 8}px`, overflowY: "auto",
                               padding: "6px 8px", whiteSpace: "pre-wrap", overflowWrap: "anywhere",
                               font: "12px sans-serif", color: "var(--input-text, #ddd)",
                               background: "var(--comfy-input-bg, #222)", borderRadius: "6px" });
  box.className = "lora-lab-text";
  box.textContent = placeholder;
  const widget = node.addDOMWidget("lora_lab_text", "lora_lab_text", box, {
    serialize: false, hideOnZoom: false, getMinHeight: () => height, getMaxHeight: () => height,
  });
  widget.serialize = false;
  node.loraLabText = box;
}

// Multiline text boxes would otherwise take all of a node's spare height, leaving the image preview
// (Sample Checkpoint's grid, Train LoRA's loss curve) a strip: they keep to a few lines.
function capTextBoxes(node) {
  for (const widget of node.widgets ?? []) {
    if (widget.type === "customtext" && widget.options) widget.options.getMaxHeight = () => MULTILINE_HEIGHT;
  }
}

// The classic canvas draws a node's pictures in an image-preview widget it adds below the others when
// it first draws them (ComfyUI_frontend: useNodeCanvasImagePreview, "$$canvas-image-preview", minimum
// height 220); a node laid out before it had pictures has no room for it and shows a sliver, so the
// node grows (never shrinks) to hold it.
const IMAGE_PREVIEW_WIDGET = "$$canvas-image-preview";
const IMAGE_ROOM = 220;
function makeRoomForImages(node) {
  const hasPreview = (node.widgets ?? []).some((widget) => widget.name === IMAGE_PREVIEW_WIDGET);
  const needed = node.computeSize()[1] + (hasPreview ? 0 : IMAGE_ROOM);
  if (node.size[1] >= needed) return;
  node.setSize([node.size[0], needed]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "lora_lab.panels",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("LoraLab")) return;
    const placeholder = TEXT_NODES[nodeData.name];
    await history;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      migrateWidgetValues(nodeData.name, info);
      return configure.apply(this, arguments);
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const layouts = widgetHistory[nodeData.name]?.layouts;
      if (layouts) this.properties = { ...(this.properties ?? {}), lora_lab_layout: layouts.length };
      capTextBoxes(this);
      if (nodeData.name === TRAIN_NODE) {
        foldSettings(this, nodeData);
        addPanel(this);
        watchWidgets(this, () => requestPlan(this));
        fitNode(this);
        requestPlan(this);
      } else if (GRID_NODES[nodeData.name]) {
        addCellView(this, GRID_NODES[nodeData.name]);
        addGridView(this);
      } else if (placeholder !== undefined) {
        addTextPanel(this, placeholder, TEXT_HEIGHTS[nodeData.name]);
      }
      if (nodeData.name === DATASET_NODE) watchWidgets(this, requestAllPlans);  // its LoRA type sets the preset
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.images?.length) makeRoomForImages(this);
      // Kept with the workflow, so what the node shows is still there after a reload or when it is cached.
      if (message?.lora_lab_dataset?.length) {
        this.properties.lora_lab_dataset = message.lora_lab_dataset[0];
        requestAllPlans();
      }
      if (message?.lora_lab_grid?.length && this.loraLabGrid) {
        this.loraLabGrid.data = this.properties.lora_lab_grid = message.lora_lab_grid[0];
        renderGrid(this);
      }
      const text = message?.text;
      if (this.loraLabText && text) {
        this.loraLabText.textContent = Array.isArray(text) ? text.join("\n") : text;
        this.properties.lora_lab_text = this.loraLabText.textContent;
      }
      saveWorkflowState();
    };
    const onAdded = nodeType.prototype.onAdded;
    nodeType.prototype.onAdded = function () {
      const result = onAdded?.apply(this, arguments);
      // Added to a graph, the frontend sizes the node for every widget: the folded ones take no room.
      if (this.loraLabPanel) setTimeout(() => fitNode(this), 0);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (this.loraLabText && this.properties?.lora_lab_text) this.loraLabText.textContent = this.properties.lora_lab_text;
      if (this.loraLabGrid && this.properties?.lora_lab_grid) {
        this.loraLabGrid.data = this.properties.lora_lab_grid;
        setTimeout(() => renderGrid(this), 0);
      }
      if (this.loraLabPanel) setTimeout(() => { applyFolding(this); fitNode(this); renderNode(this); requestPlan(this); }, 0);
      return result;
    };
  },
  async loadedGraphNode(node) {
    if (node.comfyClass === TRAIN_NODE) setTimeout(() => loadHistory(node), 0);
  },
  async nodeCreated(node) {
    if (node.comfyClass === TRAIN_NODE) setTimeout(() => loadHistory(node), 0);
  },
});
