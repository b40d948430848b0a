// The status page: polls /ui/status.json once a second and renders it. Plain JavaScript, no
// build step; every value goes in with textContent, never as HTML. The charts are SVG drawn
// here from the history the gateway keeps (gateway/ops/history.py).
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 460, HEIGHT = 150;  // each chart's viewBox
const PLOT = { left: 50, right: 10, top: 10, bottom: 20 };
const MIN_SPAN_S = 60;  // a young gateway's charts still show a minute
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#65a30d", "#4b5563", "#ea580c"];

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? (value * 1000).toFixed(1) + " ms" : value.toFixed(2) + " s";
}

function percent(share) {
  return share === null || share === undefined ? "–" : (share * 100).toFixed(1) + "%";
}

function replicaState(r) {
  if (r.draining) return "draining";
  if (r.ejected) return "ejected";
  return r.healthy ? "healthy" : "unhealthy";
}

function reported(r) {
  if (!r.reported) return "–";
  return Object.entries(r.reported)
    .filter(([, v]) => v !== null && typeof v !== "object")
    .map(([k, v]) => k + "=" + v)
    .join(" ");
}

function cell(row, field, text, className) {
  const td = document.createElement("td");
  td.dataset.field = field;
  td.textContent = String(text);
  if (className) td.className = className;
  row.appendChild(td);
}

function renderReplica(r) {
  const row = document.createElement("tr");
  row.dataset.replica = r.url;
  const state = replicaState(r);
  cell(row, "url", r.url);
  cell(row, "state", state, "state state-" + state);
  cell(row, "models", r.models === null ? "any" : r.models.join(", "));
  cell(row, "outstanding", r.outstanding);
  cell(row, "reported", reported(r));
  cell(row, "cache_hit_ratio", percent(r.cache_hit_ratio));
  cell(row, "kv_usage", percent(r.kv_usage));
  cell(row, "requests_total", r.requests_total);
  cell(row, "errors_total", r.errors_total);
  cell(row, "rate", r.recent.requests_per_s.toFixed(1));
  cell(row, "p50", seconds(r.recent.p50_s));
  cell(row, "p99", seconds(r.recent.p99_s));
  return row;
}

function renderModel(m) {
  const row = document.createElement("tr");
  row.dataset.model = m.name;
  cell(row, "name", m.name);
  cell(row, "aliases", m.aliases.length ? m.aliases.join(", ") : "–");
  cell(row, "strategy", m.strategy);
  cell(row, "available", m.available + " of " + m.replicas, m.available ? "" : "state state-unhealthy");
  return row;
}

function limitsText(limits) {
  const set = limits.filter((l) => l !== null);
  if (!set.length) return "–";
  return set.map((l) => Object.entries(l)
    .filter(([k]) => k !== "default_max_tokens")
    .map(([k, v]) => k.replace(/_per_minute$/, "/min") + " " + v)
    .join(", ")).join(" · ");
}

function counted(value) {
  return value === null || value === undefined ? "–" : value;
}

function renderTenant(t) {
  const row = document.createElement("tr");
  row.dataset.tenant = t.tenant;
  cell(row, "tenant", t.tenant);
  cell(row, "keys", t.keys.length ? t.keys.join(", ") : "–");
  cell(row, "classes", t.classes.length ? t.classes.join(", ") : "–");
  cell(row, "weight", t.weight);
  cell(row, "limits", limitsText(t.limits));
  cell(row, "queued", t.queued);
  cell(row, "service", t.service);
  cell(row, "prompt_tokens", counted(t.prompt_tokens));
  cell(row, "completion_tokens", counted(t.completion_tokens));
  cell(row, "rate_limited", counted(t.rate_limited));
  return row;
}

function svg(name, attrs) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, String(value));
  return element;
}

function label(x, y, text, anchor) {
  const element = svg("text", { x: x, y: y, "text-anchor": anchor });
  element.textContent = text;
  return element;
}

// Runs of consecutive points that have a value, broken where one is missing and where two
// points lie further apart than `gap_s` (nothing was sampled between them).
function runs(t, values, gapS) {
  const out = [[]];
  values.forEach((value, i) => {
    const missing = value === null || value === undefined;
    if (missing || (i > 0 && t[i] - t[i - 1] > gapS)) out.push([]);
    if (!missing) out[out.length - 1].push([t[i], value]);
  });
  return out.filter((run) => run.length);
}

// The smallest of 1, 2, 5 times a power of ten at or above `value` (and `floor`).
function ceiling(value, floor) {
  const v = Math.max(value, floor);
  const power = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 5, 10].map((m) => m * power).find((c) => c >= v * (1 - 1e-9));
}

function ago(seconds) {
  return "−" + (seconds >= 120 ? Math.round(seconds / 60) + " min" : Math.round(seconds) + " s");
}

// One chart: `series` is [{name, values}], a value per history point (null: none);
// `scale.top` fixes the top of the scale, else it fits the data (at least `scale.floor`).
function drawChart(name, history, series, format, scale) {
  const t = history.t_s;
  const start = Math.min(-MIN_SPAN_S, t.length ? t[0] : 0);
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const top = scale.top || ceiling(Math.max(0, ...values), scale.floor);
  const x = (at) => PLOT.left + (at - start) / -start * (WIDTH - PLOT.left - PLOT.right);
  const y = (v) => HEIGHT - PLOT.bottom - v / top * (HEIGHT - PLOT.top - PLOT.bottom);
  const bottom = HEIGHT - PLOT.bottom, right = WIDTH - PLOT.right;
  const drawn = [
    svg("line", { x1: PLOT.left, y1: PLOT.top, x2: right, y2: PLOT.top }),
    svg("line", { x1: PLOT.left, y1: y(top / 2), x2: right, y2: y(top / 2) }),
    svg("line", { x1: PLOT.left, y1: bottom, x2: right, y2: bottom }),
    label(PLOT.left - 4, PLOT.top + 4, format(top), "end"),
    label(PLOT.left - 4, y(top / 2) + 4, format(top / 2), "end"),
    label(PLOT.left - 4, bottom + 4, format(0), "end"),
    label(PLOT.left, HEIGHT - 4, ago(-start), "start"),
    label(x(start / 2), HEIGHT - 4, ago(-start / 2), "middle"),
    label(right, HEIGHT - 4, "now", "end"),
  ];
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    for (const run of runs(t, s.values, history.gap_s)) {
      const points = run.map(([at, v]) => x(at).toFixed(1) + "," + y(v).toFixed(1));
      const [at, v] = run[0];
      const mark = run.length > 1
        ? svg("polyline", { points: points.join(" "), fill: "none", stroke: color,
          "stroke-width": 1.6 })
        : svg("circle", { cx: x(at).toFixed(1), cy: y(v).toFixed(1), r: 2, fill: color });
      mark.dataset.series = s.name;
      drawn.push(mark);
    }
  });
  if (!values.length) drawn.push(label(WIDTH / 2, HEIGHT / 2, scale.empty, "middle"));
  document.getElementById("chart-" + name).replaceChildren(...drawn);
  document.getElementById("legend-" + name).replaceChildren(...series.map((s, i) => {
    const entry = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[i % COLORS.length];
    entry.append(swatch, s.name);
    return entry;
  }));
}

function seriesOf(byName) {
  return Object.entries(byName).map(([name, values]) => ({ name: name, values: values }));
}

const count = (v) => String(Math.round(v * 100) / 100);

function renderCharts(history, worker) {
  const empty = "no data yet";
  drawChart("rate", history, [{ name: "requests/s", values: history.requests_per_s }], count,
    { floor: 1, empty: empty });
  drawChart("latency", history, [
    { name: "P50", values: history.p50_s }, { name: "P99", values: history.p99_s },
  ], seconds, { floor: 0.001, empty: empty });
  drawChart("queued", history, seriesOf(history.queued), count, { floor: 1, empty: empty });
  drawChart("outstanding", history, seriesOf(history.outstanding), count,
    { floor: 1, empty: empty });
  drawChart("cache", history, [{ name: "hit rate", values: history.cache_hit_rate }],
    (v) => (v * 100).toFixed(0) + "%",
    { top: 1, empty: "no replica reports its prefix cache counts (infergate's do, on GET /load)" });
  const every = "One point every " + history.interval_s + " s over the last " +
    Math.round(history.span_s / 60) + " min, kept by the gateway (a gap: nothing ended and " +
    "no page was open). Cache hits: prompt tokens the replicas served from their prefix cache " +
    "over those looked up, from their load reports.";
  document.getElementById("history-scope").textContent = worker === null ? every : every +
    " Worker " + worker + " answered: requests/s, latency and the queue are its own (each " +
    "worker counts for itself); outstanding counts every worker's.";
}

function cost(value) {
  return value === null || value === undefined ? "–" : String(Math.round(value * 1000) / 1000);
}

function renderDecision(d, i) {
  const row = document.createElement("tr");
  row.dataset.decision = String(i);
  cell(row, "at", new Date(d.at * 1000).toLocaleTimeString([], { hour12: false }));
  cell(row, "model", d.model === null ? "–" : d.model, "text");
  cell(row, "replica", d.replica, "text");
  cell(row, "strategy", d.strategy === null ? "–" : d.strategy, "text");
  cell(row, "reason", d.reason, "text");
  cell(row, "code", d.code === 499 ? "499 (client left)" : d.code);
  cell(row, "duration", seconds(d.duration_s));
  cell(row, "cost", cost(d.cost));
  cell(row, "runner_up", d.runner_up === null ? "–" : d.runner_up, "text");
  cell(row, "runner_up_cost", cost(d.runner_up_cost));
  return row;
}

function renderDecisions(decisions, worker) {
  document.getElementById("decisions").replaceChildren(...decisions.map(renderDecision));
  document.getElementById("decisions-scope").textContent = "The last " + decisions.length +
    " requests that ended (each try of a retried one), newest first" +
    (worker === null ? "" : ", at worker " + worker) +
    ". Costs (lower wins) with routing.explain on, for strategies that choose by cost.";
}

function render(status) {
  const text = (id, value) => { document.getElementById(id).textContent = String(value); };
  text("strategy", status.strategy);
  text("replica-count", status.replicas.length);
  text("outstanding", status.outstanding);
  text("queued", status.queued);
  text("rate", status.recent.requests_per_s.toFixed(1));
  text("p50", seconds(status.recent.p50_s));
  text("p99", seconds(status.recent.p99_s));
  text("window", "over the last " + status.recent.window_s.toFixed(0) + " s" +
    (status.discovery ? " · discovery: " + status.discovery : ""));
  text("load-source", status.load_source);
  text("worker", status.worker === null ? "–" : status.worker);
  document.getElementById("replicas").replaceChildren(...status.replicas.map(renderReplica));
  document.getElementById("models").replaceChildren(...status.models.map(renderModel));
  document.getElementById("models-table").hidden = status.models.length === 0;
  document.getElementById("tenants").replaceChildren(...status.tenants.map(renderTenant));
  const keyed = status.tenants.some((t) => t.keys.length);
  document.getElementById("tenants-table").hidden = !status.flow_control && !keyed;
  renderCharts(status.history, status.worker);
  renderDecisions(status.decisions, status.worker);
  document.getElementById("error").hidden = true;
}

async function poll() {
  try {
    const response = await fetch("/ui/status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("status.json answered " + response.status);
    render(await response.json());
  } catch (error) {
    const box = document.getElementById("error");
    box.textContent = "gateway unreachable: " + error.message;
    box.hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
