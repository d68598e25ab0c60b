// Tern dashboard: devices and their latest telemetry.
// A person signs in with their account (OAuth 2.0 authorization code with PKCE, the built-in
// client `tern-portal`), or with an API token. Everything is rendered with textContent, never
// parsed as markup, so device data cannot inject any.
"use strict";

const REFRESH_MS = 5000;
const CLIENT_ID = "tern-portal";
// The dashboard only reads; the person's roles and the tenant's policies cap it further.
const SCOPE = "openid profile tern:read";
// Renew an access token this long before it expires (or after two thirds of a shorter life).
const RENEW_EARLY_MS = 30000;
const $ = (id) => document.getElementById(id);
let session = null;
let timer = null;
let renewing = null;

// A link may carry the session in its fragment (never sent to any server):
// /#tenant=acme&token=tern_api_... It is moved to sessionStorage and removed from the address bar.
function takeFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token") && params.get("tenant")) {
    saveSession({ tenant: params.get("tenant"), token: params.get("token") });
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

function saveSession(s) {
  session = s;
  sessionStorage.setItem("tern.session", JSON.stringify(s));
}

// ---- signing in with an account: authorization code + PKCE (RFC 7636, S256) ----

function base64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString() {
  const bytes = new Uint8Array(32);
  crypto.getRandomValues(bytes);
  return base64url(bytes);
}

function redirectUri() {
  return location.origin + "/";
}

function issuerPath(tenant) {
  return "/oauth2/" + encodeURIComponent(tenant);
}

async function beginSignIn(tenant) {
  if (!window.crypto || !crypto.subtle) {
    throw new Error("signing in with an account needs HTTPS (or localhost); use an API token");
  }
  const verifier = randomString();
  const state = randomString();
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem("tern.pending", JSON.stringify({ tenant, verifier, state }));
  const query = new URLSearchParams({
    response_type: "code",
    client_id: CLIENT_ID,
    redirect_uri: redirectUri(),
    scope: SCOPE,
    state,
    code_challenge: base64url(digest),
    code_challenge_method: "S256",
  });
  location.assign(issuerPath(tenant) + "/authorize?" + query);
}

// The authorization server sent the browser back with ?code=&state= (or ?error=).
async function finishSignIn() {
  const query = new URLSearchParams(location.search);
  if (!query.has("code") && !query.has("error")) return;
  history.replaceState(null, "", location.pathname);
  let pending = null;
  try {
    pending = JSON.parse(sessionStorage.getItem("tern.pending"));
  } catch (_) {}
  sessionStorage.removeItem("tern.pending");
  if (!pending || query.get("state") !== pending.state) {
    throw new Error("this sign-in was not started here; sign in again");
  }
  if (query.has("error")) {
    throw new Error("sign-in failed: " + (query.get("error_description") || query.get("error")));
  }
  const tokens = await tokenRequest(pending.tenant, {
    grant_type: "authorization_code",
    code: query.get("code"),
    redirect_uri: redirectUri(),
    client_id: CLIENT_ID,
    code_verifier: pending.verifier,
  });
  saveSession(accountSession(pending.tenant, tokens, null));
}

async function tokenRequest(tenant, form) {
  const response = await fetch(issuerPath(tenant) + "/token", {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(form),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error_description || body.error || response.statusText);
    error.status = 401;
    throw error;
  }
  return body;
}

function accountSession(tenant, tokens, who) {
  const lifetime = tokens.expires_in * 1000;
  return {
    tenant,
    token: tokens.access_token,
    refresh: tokens.refresh_token,
    renewAt: Date.now() + Math.max(lifetime - RENEW_EARLY_MS, (lifetime * 2) / 3),
    who: who || claims(tokens.id_token).preferred_username,
  };
}

// For display only: the ID token came straight from the token endpoint over this origin.
function claims(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch (_) {
    return {};
  }
}

// One renewal at a time: a refresh token is spent on use, and using it twice would revoke
// the whole sign-in (reuse detection).
function renew() {
  if (!renewing) {
    const { tenant, refresh, who } = session;
    renewing = tokenRequest(tenant, { grant_type: "refresh_token", refresh_token: refresh, client_id: CLIENT_ID })
      .then((tokens) => saveSession(accountSession(tenant, tokens, who)))
      .finally(() => {
        renewing = null;
      });
  }
  return renewing;
}

// ---- the API ----

async function api(path, retried) {
  if (session.refresh && Date.now() > session.renewAt) await renew();
  const response = await fetch("/api/v1" + path, { headers: { Authorization: "Bearer " + session.token } });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && session.refresh && !retried) {
    await renew();
    return api(path, true);
  }
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
  $("who").textContent = signedIn ? (session.who ? session.who + " in " : "") + "tenant " + session.tenant : "";
  clearInterval(timer);
  if (signedIn) {
    refresh();
    timer = setInterval(refresh, REFRESH_MS);
  }
}

function signOut(message) {
  if (session && session.refresh) {
    // Ends the sign-in on the server too (RFC 7009); the page does not wait for it.
    fetch(issuerPath(session.tenant) + "/revoke", {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ token: session.refresh, client_id: CLIENT_ID }),
    }).catch(() => {});
  }
  sessionStorage.removeItem("tern.session");
  session = null;
  show();
  showError(message || "");
}

document.addEventListener("DOMContentLoaded", async () => {
  takeFragment();
  try {
    await finishSignIn();
  } catch (error) {
    showError(error.message);
  }
  session = loadSession();
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    beginSignIn($("tenant").value.trim()).catch((error) => showError(error.message));
  });
  $("sign-in-token").addEventListener("click", () => {
    const tenant = $("tenant").value.trim();
    const token = $("token").value.trim();
    if (!tenant || !token) {
      showError("Enter the tenant and the API token.");
      return;
    }
    saveSession({ tenant, token });
    $("token").value = "";
    show();
  });
  $("sign-out").addEventListener("click", () => signOut());
  show();
});
