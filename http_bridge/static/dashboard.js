// The live endpoints page: a snapshot, then lifecycle events, from GET /dashboard/events (SSE).
// EventSource cannot send an Authorization header, so the stream is read with fetch().
"use strict";

const TOKEN_KEY = "endpoint-broker.dashboard.token";
const LOG_LINES = 50;
const endpoints = new Map(); // id -> row data, with keepaliveAt (ms, browser clock)
let controller = null;

const $ = (id) => document.getElementById(id);

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("status").textContent = message || "";
  if (message) $("token").setAttribute("placeholder", message);
}

function start(token) {
  $("login").hidden = true;
  $("main").hidden = false;
  stream(token);
}

async function stream(token) {
  if (controller) controller.abort();
  controller = new AbortController();
  $("status").textContent = "connecting…";
  let response;
  try {
    response = await fetch("/dashboard/events", {
      headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
      signal: controller.signal,
    });
  } catch (error) {
    if (error.name !== "AbortError") retry(token, "connection failed");
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    const problem = await response.json().catch(() => ({}));
    showLogin(problem.detail || "token refused");
    return;
  }
  if (!response.ok) {
    retry(token, "HTTP " + response.status);
    return;
  }
  $("status").textContent = "live";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handle(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return;
  }
  retry(token, "stream ended");
}

function retry(token, why) {
  $("status").textContent = why + "; reconnecting…";
  setTimeout(() => { if (sessionStorage.getItem(TOKEN_KEY) === token) stream(token); }, 1000);
}

function handle(message) {
  let kind = "message";
  const data = [];
  for (const line of message.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (!data.length) return;
  const body = JSON.parse(data.join("\n"));
  if (kind === "snapshot") snapshot(body.endpoints);
  else if (kind === "lifecycle") lifecycle(body);
  render();
}

function snapshot(rows) {
  const now = Date.now();
  endpoints.clear();
  for (const row of rows) {
    endpoints.set(row.id, { ...row, keepaliveAt: now - row.lastKeepaliveAgoSeconds * 1000 });
  }
}

function lifecycle(event) {
  const id = event.userEndpointId;
  const line = document.createElement("li");
  line.textContent = `${event.timestamp} ${event.type} ${id} ${event.state}` +
    (event.reason ? ` (${event.reason})` : "");
  $("log").prepend(line);
  while ($("log").children.length > LOG_LINES) $("log").lastChild.remove();
  if (event.type === "UserEndpointUnregisteredEvent") {
    endpoints.delete(id);
    return;
  }
  const row = endpoints.get(id) || { id, connected: false, transport: null, keepaliveAt: Date.now() };
  Object.assign(row, {
    userId: event.userId, organizationId: event.organizationId, state: event.state, version: event.version,
  });
  if (event.type === "UserEndpointRegisteredEvent" || event.state === "HEALTHY" && event.previousState) {
    row.keepaliveAt = Date.parse(event.timestamp) || Date.now();
  }
  if (event.type === "UserEndpointConnectedEvent") Object.assign(row, { connected: true, transport: event.transport });
  if (event.type === "UserEndpointDisconnectedEvent") Object.assign(row, { connected: false, transport: null });
  endpoints.set(id, row);
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render() {
  const needle = $("filter").value.trim().toLowerCase();
  const counts = { HEALTHY: 0, SICK: 0, UNKNOWN: 0 };
  const now = Date.now();
  const body = document.createElement("tbody");
  body.id = "rows";
  const rows = [...endpoints.values()].sort((a, b) => a.id.localeCompare(b.id));
  for (const row of rows) {
    const fields = [row.id, row.userId, row.organizationId, row.state, row.transport || ""];
    if (needle && !fields.some((f) => String(f).toLowerCase().includes(needle))) continue;
    counts[row.state] = (counts[row.state] || 0) + 1;
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    tr.dataset.state = row.state;
    const ago = Math.max(0, Math.floor((now - row.keepaliveAt) / 1000));
    tr.append(cell(row.id), cell(row.userId), cell(row.organizationId), cell(row.state, "state state-" + row.state),
      cell(row.connected ? "yes" : "no", "connected"), cell(row.transport || "—", "transport"), cell(row.version),
      cell(ago + " s ago", "ago"));
    body.append(tr);
  }
  $("rows").replaceWith(body);
  $("counts").textContent = "";
  for (const [state, count] of Object.entries(counts)) {
    const span = document.createElement("span");
    span.id = "count-" + state;
    span.textContent = `${state}: ${count}`;
    $("counts").append(span);
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  start(token);
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  if (controller) controller.abort();
  endpoints.clear();
  render();
  showLogin("");
});
$("filter").addEventListener("input", render);
setInterval(() => { if (!$("main").hidden) render(); }, 1000);

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) start(saved); else showLogin("");
