// The status page: polls /ui/status.json once a second and renders it. Plain JavaScript, no
// build step; every value goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;

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
