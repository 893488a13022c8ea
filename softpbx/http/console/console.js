// softpbx console: plain JS, no build step. Every value from the server is written with
// textContent (never innerHTML), so a caller name like "<script>" is shown as text.
"use strict";

const state = { csrf: "", inspector: null, regs: [], regsAt: 0, calls: [], callsAt: 0, cdrOffset: 0,
  cdrLimit: 25, cdrTotal: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    else if (Array.isArray(c)) { tr.appendChild(el("td", c[0], c[1])); }
    else tr.appendChild(el("td", c));
  }
  return tr;
}

function fill(bodyId, emptyId, rows) {
  const body = $(bodyId);
  body.replaceChildren(...rows);
  $(emptyId).hidden = rows.length > 0;
}

function clock(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const mm = String(m).padStart(2, "0"), rr = String(r).padStart(2, "0");
  return h ? `${h}:${mm}:${rr}` : `${m}:${rr}`;
}

function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "";
}

function showError(text) {
  const e = $("error");
  e.textContent = text || "";
  e.hidden = !text;
}

async function api(method, path, body) {
  const opts = { method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = state.csrf;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login?next=/console/"; throw new Error("login"); }
  let data = {};
  try { data = await r.json(); } catch (e) { data = {}; }
  return { status: r.status, data };
}

// -- registrations -------------------------------------------------------------------------
function renderRegs() {
  const elapsed = (Date.now() - state.regsAt) / 1000;
  $("reg-count").textContent = `(${state.regs.length})`;
  fill("reg-body", "reg-empty", state.regs.map(r => row([
    r.extension, [r.contact, "wrap"], r.transport.toUpperCase(), r.source.replace(/^[a-z]+:/, ""), [r.user_agent, "wrap"],
    [clock(r.expires_in - elapsed), "num"]])));
}

// -- live calls ----------------------------------------------------------------------------
function renderCalls() {
  const elapsed = (Date.now() - state.callsAt) / 1000;
  $("call-count").textContent = `(${state.calls.length})`;
  fill("call-body", "call-empty", state.calls.map(c => {
    const caller = c.caller_name ? `${c.caller_name} <${c.caller}>` : c.caller;
    const hang = el("button", "Hang up", "danger");
    hang.type = "button";
    hang.dataset.call = c.id;
    hang.addEventListener("click", () => hangUp(c.id, hang));
    const dur = c.talk !== null ? clock(c.talk + elapsed) : `ringing ${clock(c.age + elapsed)}`;
    const tr = row([caller, c.callee, c.direction, c.on_hold ? `${c.state} (hold)` : c.state,
      [dur, "num"], c.codec, c.recorded ? "on" : "off", hang]);
    tr.dataset.call = c.id;
    return tr;
  }));
}

async function hangUp(id, button) {
  button.disabled = true;
  const r = await api("DELETE", `/api/calls/${encodeURIComponent(id)}`);
  if (r.status !== 200) { showError(r.data.error || `hang-up failed (${r.status})`); }
}

async function originate(ev) {
  ev.preventDefault();
  const out = $("orig-result");
  out.textContent = "calling...";
  const r = await api("POST", "/api/calls", { from: $("orig-from").value, to: $("orig-to").value });
  out.textContent = r.data.status === "1" ? `placed: ${r.data.pbx_call_id}`
    : `refused (${r.status}): ${r.data.error || ""}`;
}

// -- CDRs ----------------------------------------------------------------------------------
function cdrQuery() {
  const f = new FormData($("cdr-filter"));
  const q = new URLSearchParams();
  for (const [k, v] of f.entries()) {
    if (!v) continue;
    if (k === "since" || k === "until") {
      const [y, m, d] = String(v).split("-").map(Number);
      // A day in the browser's time zone; "until" includes the day it names.
      const t = new Date(y, m - 1, d + (k === "until" ? 1 : 0)).getTime() / 1000;
      q.set(k, String(t));
    } else q.set(k, String(v));
  }
  q.set("limit", String(state.cdrLimit));
  q.set("offset", String(state.cdrOffset));
  return q;
}

function recordingCell(c) {
  const span = el("span", null, "rec");
  if (c.recording_url) {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.src = c.recording_url;
    const link = el("a", "download");
    link.href = c.recording_url;
    link.download = `${c.call_id}.mp3`;
    span.append(audio, link);
  } else if (c.recording_status) {
    span.textContent = c.recording_status;
  }
  return span;
}

async function loadCdrs() {
  const r = await api("GET", `/api/cdr?${cdrQuery()}`);
  if (r.status !== 200) { showError(r.data.error || "cannot load CDRs"); return; }
  const d = r.data;
  state.cdrTotal = d.total;
  $("cdr-count").textContent = `(${d.total})`;
  fill("cdr-body", "cdr-empty", d.cdr.map(c => {
    const tr = row([[when(c.started_at), "num"], c.direction, c.caller, c.callee,
      c.extension || c.caller_extension, c.disposition, [clock(c.duration), "num"],
      recordingCell(c)]);
    tr.dataset.call = c.call_id;
    return tr;
  }));
  const first = d.cdr.length ? state.cdrOffset + 1 : 0;
  $("cdr-page").textContent = `${first}-${state.cdrOffset + d.cdr.length} of ${d.total}`;
  $("cdr-prev").disabled = state.cdrOffset === 0;
  $("cdr-next").disabled = state.cdrOffset + d.cdr.length >= d.total;
}

// -- webhooks ------------------------------------------------------------------------------
function fieldsCell(fields) {
  const det = document.createElement("details");
  det.appendChild(el("summary", `${fields.length} fields`));
  const dl = document.createElement("dl");
  for (const [k, v] of fields) { dl.append(el("dt", k), el("dd", v)); }
  det.appendChild(dl);
  return det;
}

async function loadWebhooks() {
  const f = new FormData($("wh-filter"));
  const q = new URLSearchParams();
  for (const [k, v] of f.entries()) if (v) q.set(k, String(v));
  const r = await api("GET", `/api/webhooks?${q}`);
  if (r.status !== 200) { showError(r.data.error || "cannot load webhooks"); return; }
  const counts = r.data.counts || {};
  $("wh-counts").textContent = Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ");
  fill("wh-body", "wh-empty", r.data.webhooks.map(w => {
    let retry = el("span");
    if (w.state === "failed" || w.state === "given_up") {
      retry = el("button", "Retry");
      retry.type = "button";
      retry.addEventListener("click", async () => {
        retry.disabled = true;
        const res = await api("POST", `/api/webhooks/${w.id}/retry`);
        if (res.status !== 200) showError(res.data.error || `retry failed (${res.status})`);
        loadWebhooks();
      });
    }
    // The API gives the fields as an object in POST order; older rows may be [name, value].
    const fields = Array.isArray(w.fields) ? w.fields : Object.entries(w.fields || {});
    const latency = w.last_latency_ms !== null && w.last_latency_ms !== undefined
      ? `${Math.round(w.last_latency_ms)} ms` : "";
    const tr = row([w.id, [when(w.created_at), "num"], w.event, [w.pbx_call_id, "wrap"],
      [w.state, `state-${w.state}`], w.attempts,
      w.last_status === null ? (w.last_error || "") : w.last_status, [latency, "num"],
      fieldsCell(fields), retry]);
    tr.dataset.webhook = String(w.id);
    tr.dataset.state = w.state;
    return tr;
  }));
}

// -- status --------------------------------------------------------------------------------
function renderStatus(s) {
  const items = [["Version", s.version || "(not installed)"], ["Uptime", clock(s.uptime_s)],
    ["Started", when(s.started_at)], ["Extensions", s.extensions],
    ["Registrations", s.registrations], ["Calls", s.calls], ["Dialogs", s.dialogs],
    ["Transactions", s.transactions], ["Media sessions", s.media_sessions],
    ["RTP ports in use", s.rtp_ports], ["Store size", `${(s.store_bytes / 1024).toFixed(0)} KiB`]];
  $("status-list").replaceChildren(...items.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  $("status-listeners").replaceChildren(...(s.listeners || []).map(l => el("li", l)));
  const gws = Object.entries(s.gateways || {});
  fill("gw-body", "gw-empty", gws.map(([name, g]) => row([name, g.state, g.last_status ?? ""])));
}

// -- tabs and the live stream --------------------------------------------------------------
function showTab() {
  const name = (location.hash || "#registrations").slice(1);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === name);
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === name);
  if (name === "crm") showInspector();
  if (name === "cdr") loadCdrs();
  if (name === "webhooks") loadWebhooks();
}

function showInspector() {
  const on = state.inspector;
  $("crm-off").hidden = on !== false;
  $("crm-frame").hidden = on === false;
  if (on && location.hash === "#crm" && !$("crm-frame").getAttribute("src")) {
    $("crm-frame").src = "/crm/";
  }
}

function connect() {
  const es = new EventSource("/api/events/stream");
  const live = $("live");
  es.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
  es.addEventListener("registrations", e => {
    state.regs = JSON.parse(e.data).registrations; state.regsAt = Date.now(); renderRegs();
  });
  es.addEventListener("calls", e => {
    state.calls = JSON.parse(e.data).calls; state.callsAt = Date.now(); renderCalls();
  });
  es.addEventListener("status", e => {
    const s = JSON.parse(e.data);
    state.inspector = !!s.crm_inspector;
    renderStatus(s);
    showInspector();
  });
  es.addEventListener("cdr", () => { if (location.hash === "#cdr") loadCdrs(); });
  es.addEventListener("webhooks", () => { if (location.hash === "#webhooks") loadWebhooks(); });
}

async function start() {
  const s = await api("GET", "/api/session");
  state.csrf = s.data.csrf || "";
  $("who").textContent = s.data.user ? `signed in as ${s.data.user}` : "";
  $("logout").hidden = !s.data.login;
  $("originate").addEventListener("submit", originate);
  $("cdr-filter").addEventListener("submit", ev => { ev.preventDefault(); state.cdrOffset = 0; loadCdrs(); });
  $("cdr-prev").addEventListener("click", () => { state.cdrOffset = Math.max(0, state.cdrOffset - state.cdrLimit); loadCdrs(); });
  $("cdr-next").addEventListener("click", () => { state.cdrOffset += state.cdrLimit; loadCdrs(); });
  $("wh-filter").addEventListener("submit", ev => { ev.preventDefault(); loadWebhooks(); });
  window.addEventListener("hashchange", showTab);
  showTab();
  connect();
  // Countdowns and durations tick here, from the last event's values (no request).
  setInterval(() => { renderRegs(); renderCalls(); }, 1000);
}

document.addEventListener("DOMContentLoaded", start);
