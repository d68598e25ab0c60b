// Tern dashboard: devices and their latest telemetry, read with the tenant's API token.
// Everything is rendered with textContent, never parsed as markup, so device data cannot inject any.
"use strict";

const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
let session = null;
let timer = null;

// A link may carry the session in its fragment (never sent to any server):
// /#tenant=acme&token=tern_api_... It is moved to sessionStorage and removed from the address bar.
function takeFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token") && params.get("tenant")) {
    sessionStorage.setItem("tern.session", JSON.stringify({ tenant: params.get("tenant"), token: params.get("token") }));
    history.replaceState(null, "", location.pathname);
  }
}

function loadSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem("tern.session"));
    return s && s.tenant && s.token ? s : null;
  } catch (_) {
    return null;
  }
}

async function api(path) {
  const response = await fetch("/api/v1" + path, { headers: { Authorization: "Bearer " + session.token } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function age(ts) {
  const seconds = Math.max(0, Math.round((Date.now() - ts) / 1000));
  if (seconds < 60) return seconds + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return new Date(ts).toLocaleString();
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function metricsCell(values) {
  const td = document.createElement("td");
  const names = Object.keys(values).sort();
  if (names.length === 0) td.textContent = "-";
  for (const name of names) {
    const span = document.createElement("span");
    span.className = "metric";
    span.dataset.metric = name;
    const value = document.createElement("b");
    value.textContent = String(values[name].value);
    const when = document.createElement("span");
    when.className = "age";
    when.textContent = " (" + age(values[name].ts) + ")";
    span.append(name + " ", value, when);
    td.append(span);
  }
  return td;
}

async function refresh() {
  const tenant = encodeURIComponent(session.tenant);
  try {
    const devices = await api("/tenants/" + tenant + "/devices");
    devices.sort((a, b) => a.name.localeCompare(b.name));
    const latest = await Promise.all(
      devices.map((d) => api("/tenants/" + tenant + "/devices/" + d.id + "/telemetry/latest").catch(() => ({ values: {} })))
    );
    const rows = devices.map((device, i) => {
      const tr = document.createElement("tr");
      tr.dataset.device = device.id;
      const labels = Object.entries(device.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
      tr.append(cell(device.name), cell(labels || "-"), metricsCell(latest[i].values || {}), cell(device.id, "id"));
      return tr;
    });
    $("device-rows").replaceChildren(...rows);
    $("empty").hidden = devices.length > 0;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    showError("");
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      signOut("Signed out: " + error.message);
      return;
    }
    showError("Cannot load devices: " + error.message);
  }
}

function show() {
  const signedIn = session !== null;
  $("sign-in").hidden = signedIn;
  $("devices").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  $("who").textContent = signedIn ? "tenant " + session.tenant : "";
  clearInterval(timer);
  if (signedIn) {
    refresh();
    timer = setInterval(refresh, REFRESH_MS);
  }
}

function signOut(message) {
  sessionStorage.removeItem("tern.session");
  session = null;
  show();
  showError(message || "");
}

document.addEventListener("DOMContentLoaded", () => {
  takeFragment();
  session = loadSession();
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    session = { tenant: $("tenant").value.trim(), token: $("token").value.trim() };
    sessionStorage.setItem("tern.session", JSON.stringify(session));
    $("token").value = "";
    show();
  });
  $("sign-out").addEventListener("click", () => signOut());
  show();
});
