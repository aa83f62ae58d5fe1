// The operator page of onboardflow's personalization API (runners/api/operator.py).
// Read-only: it calls the JSON routes with the key kept in sessionStorage, writes
// only textContent (no HTML from data), and never shows the user id typed in:
// the field is cleared once the lookup is sent and the profile shows the pseudonym.
"use strict";

const KEY = "onboardflow-api-key";
const $ = (id) => document.getElementById(id);

function apiKey() { return sessionStorage.getItem(KEY) || ""; }

function showError(text) { $("error").textContent = text || ""; }

function refusal(status, body) {
  const detail = body && body.detail ? body.detail : "";
  if (status === 401) return "Refused: " + (detail || "no valid API key");
  if (status === 403) return "Refused: " + (detail || "the key lacks a scope this view needs");
  if (status === 429) return "Slow down: " + (detail || "rate limit reached");
  return "Error " + status + (detail ? ": " + detail : "");
}

async function call(path) {
  const key = apiKey();
  if (!key) {
    return { ok: false, status: 401, body: { detail: "no API key: enter one above" } };
  }
  let response;
  try {
    response = await fetch(path, { headers: { "Authorization": "Bearer " + key }, cache: "no-store" });
  } catch (e) {
    return { ok: false, status: 0, body: { detail: "the API cannot be reached" } };
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { ok: response.ok, status: response.status, body: body };
}

function clearOverview() {
  $("segments").querySelector("tbody").replaceChildren();
  $("models").textContent = "";
  $("lag").textContent = "";
}

function renderSegments(body) {
  const rows = body.segments.map((s) => {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    name.textContent = s.name;
    const size = document.createElement("td");
    size.className = "size";
    size.textContent = String(s.size);
    tr.append(name, size);
    return tr;
  });
  $("segments").querySelector("tbody").replaceChildren(...rows);
}

function renderStatus(body) {
  const lines = Object.keys(body.models).sort().map((kind) => {
    const m = body.models[kind];
    return kind + ": " + (m ? m.version_id + (m.pinned ? " (pinned)" : "") + ", since " + m.updated_at
                            : "none published");
  });
  if (body.models_error) lines.push(body.models_error);
  $("models").textContent = lines.join("\n");
  const lag = body.lag;
  if (!lag) {
    $("lag").textContent = "no Kafka configured for this server";
  } else if (lag.kafka_error) {
    $("lag").textContent = "group " + lag.group + ": Kafka unreadable: " + lag.kafka_error;
  } else {
    const eventLag = lag.event_time_lag_s === null ? "unknown" : lag.event_time_lag_s.toFixed(1) + " s";
    $("lag").textContent = "group " + lag.group + ": " + lag.total_lag + " records behind over " +
      lag.partitions + " partitions; event-time lag " + eventLag;
  }
}

async function loadOverview() {
  clearOverview();
  const [segments, status] = await Promise.all([call("/v1/segments"), call("/v1/status")]);
  const errors = [];
  if (segments.ok) renderSegments(segments.body); else errors.push(refusal(segments.status, segments.body));
  if (status.ok) renderStatus(status.body); else errors.push(refusal(status.status, status.body));
  showError([...new Set(errors)].join(" "));
}

async function lookup() {
  const input = $("user-id");
  const userId = input.value;
  input.value = "";
  $("profile").textContent = "";
  if (!userId) { showError("Enter a user id to look up."); return; }
  const result = await call("/v1/profiles/" + encodeURIComponent(userId));
  if (result.ok) {
    showError("");
    const profile = result.body;
    $("profile").textContent = "pseudonym (user_key): " + profile.user_key + "\n" +
      JSON.stringify(profile, null, 2);
  } else if (result.status === 404) {
    showError("");
    const pseudonym = result.body && result.body.user_key ? " (pseudonym " + result.body.user_key + ")" : "";
    $("profile").textContent = "No profile for this user" + pseudonym + ".";
  } else {
    showError(refusal(result.status, result.body));
  }
}

function saveKey() {
  const input = $("api-key");
  const key = input.value.trim();
  input.value = "";
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("key-state").textContent = key ? "key set for this tab" : "";
  loadOverview();
}

document.addEventListener("DOMContentLoaded", () => {
  $("save-key").addEventListener("click", saveKey);
  $("lookup").addEventListener("click", lookup);
  $("user-id").addEventListener("keydown", (e) => { if (e.key === "Enter") lookup(); });
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") saveKey(); });
  if (apiKey()) {
    $("key-state").textContent = "key set for this tab";
    loadOverview();
  } else {
    showError("Refused: no API key: enter one above.");
  }
});
