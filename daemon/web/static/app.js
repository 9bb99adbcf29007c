// lightbucket's page: status, preview, charts and controls from the daemon's own API
// (docs/web.md). No framework, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const S = { status: null, frames: [], csrf: null, passwordSet: false, stack: null, meta: null, view: null, pinned: false,
            ws: null, wsDelay: 1000, tile: null };

// ---------------------------------------------------------------- formatting
function fmtDuration(s) {
  if (s == null || isNaN(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h} h ${String(m).padStart(2, "0")} m` : m ? `${m} m ${String(r).padStart(2, "0")} s` : `${r} s`;
}
function fmtBytes(b) {
  if (b == null) return "–";
  const u = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (b >= 1000 && i < u.length - 1) { b /= 1000; i++; }
  return `${b.toFixed(i > 2 ? 1 : 0)} ${u[i]}`;
}
const num = (v, d = 2) => (v == null || isNaN(v) ? "–" : Number(v).toFixed(d));
const base = (p) => String(p || "").split("/").pop();

// ---------------------------------------------------------------- status
const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "?");

/** What the plan's state needs said beyond "state frame/count": why it waits, was refused,
 * flips, or could not park (the plan events of daemon.acquisition). */
function planNote(plan) {
  if (!plan) return "";
  const s = plan.state || "";
  if (s === "waiting") return `waiting until ${clock(plan.start)}` + (plan.reason ? `: ${plan.reason}` : "");
  if (s === "refused") return `refused: ${plan.reason || ""}`;
  if (s === "flipping") return `meridian flip (pier ${plan.pier_side || "?"})`;
  if (s === "park failed") return `park failed: ${plan.error || ""}` + (plan.tracking === false ? " — tracking stopped" : "");
  if (s === "failed") return `failed: ${plan.error || plan.reason || ""}`;
  if (s === "running" && plan.pier_side) return `pier ${plan.pier_side}` + (plan.until ? `, until ${clock(plan.until)}` : "");
  return "";
}

function renderStatus(st) {
  S.status = st;
  if (S.pinned && S.stack === st.stack) S.pinned = false;  // the picked stack is being fed again
  const state = st.state || "?";
  $("state").textContent = state;
  $("state").className = "pill" + (state === "running" ? "" : " alert");
  if (!S.pinned) $("stack-name").textContent = st.stack || "no stack yet";
  const f = st.frames || {};
  $("n-stacked").textContent = st.stacked_current ?? 0;
  $("n-rejected").textContent = f.rejected ?? 0;
  $("integration").textContent = fmtDuration(st.total_exposure_s);
  $("queue").textContent = st.queue ?? 0;
  const plan = st.plan;
  $("plan").textContent = plan ? `${plan.frame_type || ""} ${plan.frame ?? 0}/${plan.count || "∞"} ${plan.state || ""}` : "–";
  $("eta").textContent = plan && plan.eta_s != null ? fmtDuration(plan.eta_s) : "–";
  $("disk").textContent = fmtBytes(st.disk_free_bytes);
  $("temp").textContent = plan && plan.temperature_c != null ? `${num(plan.temperature_c, 1)} °C` : "–";
  const note = planNote(plan);
  $("plan-note-cell").hidden = !note;
  $("plan-note").textContent = note;
  $("plan-note").className = "mid" + (plan && /failed|refused/.test(plan.state || "") ? " bad" : "");
  // The current stack at half resolution for want of memory (debayer "auto"): why, and what forces full.
  $("resolution-note-cell").hidden = !st.resolution_note;
  $("resolution-note").textContent = st.resolution_note || "";
  const night = (st.plan_queue || {}).entries || [];
  $("plans-cell").hidden = night.length < 2;
  $("plans").textContent = night.map((e) => `${e.target || e.frame_type} ${e.frames}/${e.count || "∞"} ${e.state}`).join(" · ");
  // The broker link (status.mqtt), when the daemon has [mqtt]: the page itself does not need it.
  $("mqtt-cell").hidden = st.mqtt == null;
  if (st.mqtt != null) {
    $("mqtt").textContent = st.mqtt;
    $("mqtt").className = "mid" + (st.mqtt === "connected" ? "" : " bad");
  }
  const exp = st.exposure_s;
  $("darks-label").textContent = exp ? `Darks matching the lights (${num(exp, exp % 1 ? 1 : 0)} s)` : "Darks matching the lights";
  const sel = $("stack-select"), names = Object.keys(st.stacks || {});
  const want = S.pinned && names.includes(S.stack) ? S.stack : st.stack;
  if (sel.options.length !== names.length || names.some((n, i) => sel.options[i].value !== n)) {
    sel.replaceChildren(...names.map((n) => new Option(`${n} (${st.stacks[n]})`, n)));
  } else {
    names.forEach((n, i) => { sel.options[i].text = `${n} (${st.stacks[n]})`; });
  }
  $("stack-pick").hidden = names.length < 2;
  if (want) sel.value = want;
  S.stack = sel.value || st.stack || null;
  pointingStatus(st);
}

// ---------------------------------------------------------------- preview, last sub, zoom
function refreshPreview() {
  const img = $("preview");
  const current = S.status && S.status.stack;
  if (S.stack && current && S.stack !== current) {  // another stack than the one being fed
    const name = S.stack;
    fetch(`/api/stack/${encodeURIComponent(name)}/preview.jpg`).then(async (r) => {
      if (!r.ok) return;
      const w = +r.headers.get("X-Image-Width"), h = +r.headers.get("X-Image-Height");
      const url = URL.createObjectURL(await r.blob());
      img.onload = () => URL.revokeObjectURL(url);
      img.src = url; img.hidden = false; $("preview-none").hidden = true;
      S.view = { stack: name, width: w, height: h };
      $("stack-name").textContent = `${name} (viewing; new frames go to ${current})`;
    }).catch(() => {});
    return;
  }
  const probe = new Image();
  probe.onload = () => { img.src = probe.src; img.hidden = false; $("preview-none").hidden = true; };
  probe.onerror = () => { if (!img.src) { img.hidden = true; $("preview-none").hidden = false; } };
  probe.src = `/api/preview.jpg?t=${Date.now()}`;
  fetch("/api/preview.json").then((r) => r.json()).then((m) => { if (m) { S.meta = m; S.view = m; } }).catch(() => {});
}
function refreshSub(path) {
  const img = $("sub");
  img.onload = () => { img.hidden = false; };
  img.src = `/api/last_sub.jpg?t=${Date.now()}`;
  $("sub-name").textContent = base(path);
}
function openTile(x, y, size) {
  const name = (S.view && S.view.stack) || S.stack;
  if (!name) return;
  S.tile = { name, x: Math.round(x), y: Math.round(y), size: size || (S.tile ? S.tile.size : 512) };
  const t = S.tile;
  const img = $("zoom-img");
  img.onload = () => { $("zoom-where").textContent = `${t.name} @ ${t.x}, ${t.y}: ${img.naturalWidth}×${img.naturalHeight} px, 1:1`; };
  img.src = `/api/stack/${encodeURIComponent(t.name)}/tile?x=${t.x}&y=${t.y}&size=${t.size}`;
  $("zoom-where").textContent = `${t.name} @ ${t.x}, ${t.y}`;
  $("zoom").hidden = false;
}
function setupZoom() {
  $("preview").addEventListener("click", (e) => {
    const img = e.currentTarget, m = S.view;
    if (!m || !m.width) return;
    // The picture inside the element (object-fit: contain may letterbox it).
    const r = img.getBoundingClientRect(), k = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    const dw = img.naturalWidth * k, dh = img.naturalHeight * k;
    const fx = (e.clientX - r.left - (r.width - dw) / 2) / dw, fy = (e.clientY - r.top - (r.height - dh) / 2) / dh;
    if (fx < 0 || fx > 1 || fy < 0 || fy > 1) return;
    openTile(fx * m.width, fy * m.height, 512);
  });
  $("zoom-img").addEventListener("click", (e) => {  // recentre on the point tapped (1 screen px = 1 px)
    const r = e.currentTarget.getBoundingClientRect(), t = S.tile;
    const k = e.currentTarget.naturalWidth / r.width;
    openTile(t.x + (e.clientX - r.left - r.width / 2) * k, t.y + (e.clientY - r.top - r.height / 2) * k, t.size);
  });
  const resize = (f) => { const t = S.tile; openTile(t.x, t.y, Math.max(128, Math.min(1024, Math.round(t.size * f)))); };
  $("zoom-in").onclick = () => resize(0.5);
  $("zoom-out").onclick = () => resize(2);
  $("zoom-close").onclick = () => { $("zoom").hidden = true; };
  $("zoom-box").addEventListener("wheel", (e) => { e.preventDefault(); resize(e.deltaY < 0 ? 0.5 : 2); }, { passive: false });
}

// ---------------------------------------------------------------- charts (canvas)
// One chart per quantity, x = frame number of the night (times at the ends), y = value; accepted
// frames joined by a line, rejected ones a × labelled with the reason's first word (a rejected
// frame without that value sits on the bottom edge). Tapping a chart names the nearest frame.
const COLORS = ["#d42a1e", "#d42a1e"], DASHES = [[], [5, 4]];
const hhmm = (t) => { const d = new Date(t); return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }); };
const reasonWord = (r) => String(r || "rejected").split(":")[0].trim();
function drawChart(canvas) {
  const keys = canvas.dataset.key.split(","), frames = S.frames.filter((f) => !f.error);
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.max(1, Math.round(w * dpr)); canvas.height = Math.max(1, Math.round(h * dpr));
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const vals = frames.flatMap((f) => keys.map((k) => f[k])).filter((v) => v != null && isFinite(v));
  canvas.dataset.n = frames.length;
  canvas.dataset.rejected = frames.filter((f) => !f.accepted).length;
  g.strokeStyle = "#2a0804"; g.lineWidth = 1; g.strokeRect(0.5, 0.5, w - 1, h - 1);
  const pad = 18, X = (i) => pad + (frames.length < 2 ? 0.5 : i / (frames.length - 1)) * (w - 2 * pad);
  canvas._pick = { frames, X };
  if (!frames.length) return;
  let lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 1;
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const top = 16, bottom = h - 14, Y = (v) => bottom - (v - lo) / (hi - lo) * (bottom - top);
  const ints = vals.every((v) => Number.isInteger(v)), digits = ints || hi - lo >= 100 ? 0 : hi - lo >= 10 ? 1 : 2;
  g.fillStyle = "#93261a"; g.font = "12px system-ui";
  g.textAlign = "left"; g.fillText(num(hi, digits), 3, 12); g.fillText(num(lo, digits), 3, h - 3);
  g.textAlign = "right";
  const t0 = hhmm(frames[0].time), t1 = hhmm(frames[frames.length - 1].time);
  if (t0) g.fillText(t0 === t1 ? t0 : `${t0} – ${t1}`, w - 3, h - 3);
  keys.forEach((k, j) => {
    g.strokeStyle = COLORS[j]; g.lineWidth = 1.5; g.setLineDash(DASHES[j]); g.beginPath();
    let started = false;
    frames.forEach((f, i) => {
      if (f[k] == null || !f.accepted) return;
      if (started) g.lineTo(X(i), Y(f[k])); else { g.moveTo(X(i), Y(f[k])); started = true; }
    });
    g.stroke(); g.setLineDash([]);
    g.fillStyle = COLORS[j];
    frames.forEach((f, i) => { if (f.accepted && f[k] != null && isFinite(f[k])) g.fillRect(X(i) - 2, Y(f[k]) - 2, 4, 4); });
  });
  // Rejected frames: one × each (at the first key's value), labelled where there is room.
  let labelEnd = -Infinity;
  g.textAlign = "center"; g.font = "11px system-ui";
  frames.forEach((f, i) => {
    if (f.accepted) return;
    const v = keys.map((k) => f[k]).find((u) => u != null && isFinite(u));
    const x = X(i), y = v == null ? bottom : Y(v);
    g.strokeStyle = "#ff4a3a"; g.lineWidth = 2; g.beginPath();
    g.moveTo(x - 4, y - 4); g.lineTo(x + 4, y + 4); g.moveTo(x + 4, y - 4); g.lineTo(x - 4, y + 4); g.stroke();
    const word = reasonWord(f.reason), half = g.measureText(word).width / 2 + 2;
    if (x - half > labelEnd) {
      g.fillStyle = "#ff4a3a"; g.fillText(word, Math.min(Math.max(x, half), w - half), y < top + 14 ? y + 15 : y - 7);
      labelEnd = x + half;
    }
  });
}
function frameText(f) {
  const when = hhmm(f.time);
  const what = f.accepted ? `stacked · FWHM ${num(f.fwhm_px)} · ecc ${num(f.eccentricity)} · ${f.stars ?? "–"}★`
    : `rejected: ${f.reason}`;
  return `${base(f.path)}${when ? " · " + when : ""} · ${what}`;
}
function pickOnChart(e) {
  const c = e.currentTarget, p = c._pick;
  if (!p || !p.frames.length) return;
  const x = e.clientX - c.getBoundingClientRect().left;
  let best = 0;
  p.frames.forEach((f, i) => { if (Math.abs(p.X(i) - x) < Math.abs(p.X(best) - x)) best = i; });
  const f = p.frames[best], out = c.parentElement.querySelector(".pick");
  out.textContent = frameText(f);
  out.className = "pick" + (f.accepted ? "" : " bad");
}
let chartTimer = null;
function drawCharts() {
  clearTimeout(chartTimer);
  chartTimer = setTimeout(() => document.querySelectorAll("#charts canvas").forEach(drawChart), 50);
}

// ---------------------------------------------------------------- frame log
function frameItem(f) {
  const li = document.createElement("li");
  li.className = f.error ? "error" : f.accepted ? "stacked" : "rejected";
  const name = document.createElement("span"); name.className = "name"; name.textContent = base(f.path);
  const verdict = document.createElement("span"); verdict.className = "verdict";
  const when = hhmm(f.time);
  verdict.textContent = (when ? when + " · " : "") + (f.error ? `error: ${f.reason}` : f.accepted
    ? `stacked · FWHM ${num(f.fwhm_px)} · ${f.stars ?? "–"}★` : `rejected: ${f.reason}`);
  li.append(name);
  if (!f.error) {
    const b = document.createElement("button"); b.textContent = "reference";
    b.title = "make this frame the stack's registration reference";
    b.onclick = () => confirmThen(`Make ${base(f.path)} the reference? Its stack is emptied and stacked again.`,
      () => send({ action: "set_reference", path: f.path }));
    li.append(b);
  }
  li.append(verdict);
  return li;
}
function addFrame(f) {
  S.frames.push(f);
  if (S.frames.length > 2000) S.frames.shift();
  const ol = $("frames");
  ol.prepend(frameItem(f));
  while (ol.children.length > 100) ol.lastChild.remove();
  drawCharts();
}

// ---------------------------------------------------------------- commands and login
let cmdId = 0, toastTimer = null;
function showResult(el, ok, text) { el.textContent = text; el.className = "result " + (ok ? "ok" : "bad"); }
function reply(ok, text) {  // a command's result: in the controls and as a toast wherever the page is scrolled
  showResult($("cmd-result"), ok, text);
  const t = $("toast");
  showResult(t, ok, text); t.hidden = false;
  clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, ok ? 5000 : 10000);
}
async function send(cmd) {
  if ((cmd.action === "reset" || cmd.action === "restack") && !cmd.stack && S.stack) cmd.stack = S.stack;
  const body = JSON.stringify({ id: `web-${Date.now()}-${++cmdId}`, ...cmd });
  reply(true, `${cmd.action}…`);
  let r;
  try {
    r = await fetch("/api/cmd", { method: "POST", body, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf || "" } });
  } catch (e) { reply(false, `${cmd.action}: the daemon cannot be reached (${e})`); return; }
  const answer = await r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` }));
  if (r.status === 401) {
    reply(false, `${cmd.action}: refused: ${answer.error}`);
    openLogin(`${cmd.action} needs the password; log in, then press it again.`); return;
  }
  if (answer.ok) {
    const extra = Object.entries(answer).filter(([k]) => !["id", "ok", "action"].includes(k))
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
    reply(true, `${cmd.action}: done${extra ? " — " + extra : ""}`);
  } else reply(false, `${cmd.action}: refused: ${answer.error}`);
}
function confirmThen(text, fn) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  d.onclose = () => { if (d.returnValue === "yes") fn(); };
  d.returnValue = ""; d.showModal();
}
function openLogin(why) {
  if (!S.passwordSet) return;
  showResult($("login-result"), true, why || ""); $("password").value = "";
  $("login").showModal(); $("password").focus();
}
async function session() {
  try {
    const s = await (await fetch("/api/session", { credentials: "same-origin" })).json();
    S.passwordSet = s.password_set; S.csrf = s.csrf;
    $("viewonly").hidden = s.password_set;
    document.querySelectorAll("#controls button").forEach((b) => { b.disabled = !s.password_set; });
    $("login-open").textContent = s.logged_in ? "log out" : "log in";
    $("login-open").hidden = !s.password_set;
  } catch (e) { /* offline: retried with the live channel */ }
}
function setupControls() {
  document.querySelectorAll("#controls button[data-action]").forEach((b) => {
    b.onclick = () => {
      const action = b.dataset.action;
      if (action === "reset") {
        const name = S.stack || "the current stack";
        confirmThen(`Reset ${name}? Its frames and its spool (for the final re-stack) are removed.`,
          () => send({ action: "reset" }));
      } else if (action === "stop") {
        confirmThen("Stop acquisition and stacking? (Start resumes both.)", () => send({ action: "stop" }));
      } else send({ action });
    };
  });
  $("darks").onclick = () => {
    const n = parseInt($("dark-count").value, 10);
    if (!(n > 0)) { reply(false, "darks: give a count"); return; }
    // The current stack's exposure when known (the lights being taken), else the config's [plan].
    const exp = S.status && S.status.exposure_s;
    send({ action: "plan", frame_type: "dark", count: n, ...(exp ? { exposure_s: exp } : {}) });
  };
  $("stack-select").onchange = (e) => {
    S.stack = e.target.value;
    S.pinned = !!S.status && S.stack !== S.status.stack;  // follow the fed stack unless another is picked
    if (S.status && !S.pinned) $("stack-name").textContent = S.status.stack || "no stack yet";
    refreshPreview();
  };
  $("login-open").onclick = async () => {
    if (S.csrf) {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
      await session();
    } else openLogin();
  };
  $("night").onclick = () => {  // red images (night vision) or true colour
    const on = document.body.classList.toggle("night");
    $("night").setAttribute("aria-pressed", String(on));
    $("night").textContent = on ? "true colour" : "red";
    try { localStorage.setItem("lb-night", on ? "1" : "0"); } catch (e) { /* private mode */ }
  };
  try { if (localStorage.getItem("lb-night") === "0") $("night").click(); } catch (e) { /* private mode */ }
  $("login-cancel").onclick = () => $("login").close();
  $("login-form").onsubmit = async (e) => {
    e.preventDefault();
    const r = await fetch("/api/login", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ password: $("password").value }) });
    const answer = await r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` }));
    if (answer.ok) { S.csrf = answer.csrf; $("login").close(); await session(); showResult($("cmd-result"), true, "logged in"); }
    else showResult($("login-result"), false, answer.error);
  };
}

// ---------------------------------------------------------------- live channel
function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/live`);
  S.ws = ws;
  ws.onopen = () => { $("link").textContent = "live"; $("link").className = "pill"; S.wsDelay = 1000; };
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.kind === "status") renderStatus(m.data);
    else if (m.kind === "frame") { addFrame(m.data); if (!m.data.error) refreshSub(m.data.path); }
    else if (m.kind === "preview") { S.meta = m.data; if (!S.stack || S.stack === m.data.stack) S.view = m.data; refreshPreview(); }
    else if (m.kind === "acquisition") pointingEvent(m.data);
  };
  ws.onclose = () => {
    $("link").textContent = "offline"; $("link").className = "pill dim";
    setTimeout(() => { poll(); connect(); }, S.wsDelay);
    S.wsDelay = Math.min(S.wsDelay * 2, 15000);
  };
}
async function poll() {
  try { renderStatus(await (await fetch("/api/status")).json()); } catch (e) { /* the daemon is away */ }
}
async function loadFrames() {
  try {
    const { frames } = await (await fetch("/api/frames?n=500")).json();
    S.frames = []; $("frames").replaceChildren();
    frames.forEach(addFrame);
    const last = frames.filter((f) => !f.error).pop();
    if (last) refreshSub(last.path);
  } catch (e) { /* retried on reconnect */ }
}

window.addEventListener("DOMContentLoaded", async () => {
  setupControls(); setupZoom();
  document.querySelectorAll("#charts canvas").forEach((c) => {
    const p = document.createElement("p"); p.className = "pick"; p.setAttribute("aria-live", "polite");
    c.after(p); c.addEventListener("click", pickOnChart);
  });
  await session(); await poll(); await loadFrames(); refreshPreview(); connect();
  window.addEventListener("resize", drawCharts);
});
