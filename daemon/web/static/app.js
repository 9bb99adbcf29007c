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
function renderStatus(st) {
  S.status = st;
  $("state").textContent = st.state || "?";
  $("state").className = "pill" + (st.state === "running" ? "" : " dim");
  if (!S.stack || S.stack === st.stack) $("stack-name").textContent = st.stack || "no stack yet";
  const f = st.frames || {};
  $("n-stacked").textContent = st.stacked_current ?? 0;
  $("n-rejected").textContent = f.rejected ?? 0;
  $("integration").textContent = fmtDuration(st.total_exposure_s);
  $("queue").textContent = st.queue ?? 0;
  const plan = st.plan;
  $("plan").textContent = plan ? `${plan.frame_type || ""} ${plan.frame ?? 0}/${plan.count ?? "∞"} ${plan.state || ""}` : "–";
  $("eta").textContent = plan && plan.eta_s != null ? fmtDuration(plan.eta_s) : "–";
  $("disk").textContent = fmtBytes(st.disk_free_bytes);
  $("temp").textContent = plan && plan.temperature_c != null ? `${num(plan.temperature_c, 1)} °C` : "–";
  const sel = $("stack-select"), names = Object.keys(st.stacks || {});
  const want = S.pinned && names.includes(S.stack) ? S.stack : st.stack;
  if (sel.options.length !== names.length || names.some((n, i) => sel.options[i].value !== n)) {
    sel.replaceChildren(...names.map((n) => new Option(`${n} (${st.stacks[n]})`, n)));
  } else {
    names.forEach((n, i) => { sel.options[i].text = `${n} (${st.stacks[n]})`; });
  }
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
  $("zoom-img").src = `/api/stack/${encodeURIComponent(t.name)}/tile?x=${t.x}&y=${t.y}&size=${t.size}`;
  $("zoom-where").textContent = `${t.name} @ ${t.x}, ${t.y} (${t.size} px)`;
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
const COLORS = ["#d42a1e", "#c86420"];
function drawChart(canvas) {
  const keys = canvas.dataset.key.split(","), frames = S.frames.filter((f) => !f.error);
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.max(1, Math.round(w * dpr)); canvas.height = Math.max(1, Math.round(h * dpr));
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const vals = frames.flatMap((f) => keys.map((k) => f[k])).filter((v) => v != null && isFinite(v));
  canvas.dataset.n = frames.length;
  g.strokeStyle = "#2a0804"; g.lineWidth = 1; g.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (!vals.length) return;
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const pad = 16, X = (i) => pad + (frames.length < 2 ? 0.5 : i / (frames.length - 1)) * (w - 2 * pad);
  const Y = (v) => h - 12 - (v - lo) / (hi - lo) * (h - 24);
  g.fillStyle = "#7a1a12"; g.font = "11px system-ui";
  g.fillText(num(hi, hi >= 100 ? 0 : 2), 3, 11); g.fillText(num(lo, hi >= 100 ? 0 : 2), 3, h - 2);
  keys.forEach((k, j) => {
    g.strokeStyle = COLORS[j % COLORS.length]; g.lineWidth = 1.5; g.beginPath();
    let started = false;
    frames.forEach((f, i) => {
      if (f[k] == null || !f.accepted) return;
      if (started) g.lineTo(X(i), Y(f[k])); else { g.moveTo(X(i), Y(f[k])); started = true; }
    });
    g.stroke();
    frames.forEach((f, i) => {
      const v = f[k]; if (v == null || !isFinite(v)) return;
      const x = X(i), y = Y(v);
      if (f.accepted) { g.fillStyle = COLORS[j % COLORS.length]; g.fillRect(x - 2, y - 2, 4, 4); }
      else { g.strokeStyle = "#ff5040"; g.lineWidth = 2; g.beginPath();
        g.moveTo(x - 4, y - 4); g.lineTo(x + 4, y + 4); g.moveTo(x + 4, y - 4); g.lineTo(x - 4, y + 4); g.stroke(); }
    });
  });
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
  verdict.textContent = f.error ? `error: ${f.reason}` : f.accepted
    ? `stacked · FWHM ${num(f.fwhm_px)} · ${f.stars ?? "–"}★` : `rejected: ${f.reason}`;
  li.append(name, verdict);
  if (!f.error) {
    const b = document.createElement("button"); b.textContent = "reference";
    b.title = "make this frame the stack's registration reference";
    b.onclick = () => confirmThen(`Make ${base(f.path)} the reference? Its stack is emptied and stacked again.`,
      () => send({ action: "set_reference", path: f.path }));
    li.append(b);
  }
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
let cmdId = 0;
function showResult(el, ok, text) { el.textContent = text; el.className = "result " + (ok ? "ok" : "bad"); }
async function send(cmd) {
  const out = $("cmd-result");
  if ((cmd.action === "reset" || cmd.action === "restack") && !cmd.stack && S.stack) cmd.stack = S.stack;
  const body = JSON.stringify({ id: `web-${Date.now()}-${++cmdId}`, ...cmd });
  showResult(out, true, `${cmd.action}…`);
  let r;
  try {
    r = await fetch("/api/cmd", { method: "POST", body, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf || "" } });
  } catch (e) { showResult(out, false, `${cmd.action}: the daemon cannot be reached (${e})`); return; }
  const reply = await r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` }));
  if (r.status === 401) { showResult(out, false, `${cmd.action}: refused: ${reply.error}`); openLogin(); return; }
  if (reply.ok) {
    const extra = Object.entries(reply).filter(([k]) => !["id", "ok", "action"].includes(k))
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
    showResult(out, true, `${cmd.action}: done${extra ? " — " + extra : ""}`);
  } else showResult(out, false, `${cmd.action}: refused: ${reply.error}`);
}
function confirmThen(text, fn) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  d.onclose = () => { if (d.returnValue === "yes") fn(); };
  d.returnValue = ""; d.showModal();
}
function openLogin() {
  if (!S.passwordSet) return;
  $("login-result").textContent = ""; $("password").value = "";
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
        confirmThen("Stop acquisition and stacking?", () => send({ action: "stop" }));
      } else send({ action });
    };
  });
  $("darks").onclick = () => {
    const n = parseInt($("dark-count").value, 10);
    if (!(n > 0)) { showResult($("cmd-result"), false, "darks: give a count"); return; }
    send({ action: "plan", frame_type: "dark", count: n });
  };
  $("stack-select").onchange = (e) => {
    S.stack = e.target.value;
    S.pinned = !!S.status && S.stack !== S.status.stack;  // follow the fed stack unless another is picked
    if (S.status) $("stack-name").textContent = S.status.stack || "no stack yet";
    refreshPreview();
  };
  $("login-open").onclick = async () => {
    if (S.csrf) {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
      await session();
    } else openLogin();
  };
  $("night").onclick = () => {  // red-tinted images (night vision) or true colour
    const on = document.body.classList.toggle("night");
    $("night").setAttribute("aria-pressed", String(on));
    try { localStorage.setItem("lb-night", on ? "1" : "0"); } catch (e) { /* private mode */ }
  };
  try { if (localStorage.getItem("lb-night") === "0") $("night").click(); } catch (e) { /* private mode */ }
  $("login-cancel").onclick = () => $("login").close();
  $("login-form").onsubmit = async (e) => {
    e.preventDefault();
    const r = await fetch("/api/login", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ password: $("password").value }) });
    const reply = await r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` }));
    if (reply.ok) { S.csrf = reply.csrf; $("login").close(); await session(); showResult($("cmd-result"), true, "logged in"); }
    else showResult($("login-result"), false, reply.error);
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
  await session(); await poll(); await loadFrames(); refreshPreview(); connect();
  window.addEventListener("resize", drawCharts);
});
