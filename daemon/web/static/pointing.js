// Pointing and focus on the page: where the stack's reference frame points (its plate solve,
// the centring's error from the target) and the last autofocus curve. Reads the status's
// `solve`, `pointing`, `focus` and `plan`, and the live channel's acquisition events
// (`solve`, `pointing`, `focusing`, `autofocus`, `plan`). Loaded after app.js (uses $, num, S).
"use strict";

const P = { solve: null, pointing: null, focus: null, live: [], centring: null };

function hms(deg) {
  let s = Math.round(((deg % 360) + 360) % 360 / 15 * 3600);
  const h = Math.floor(s / 3600); s -= h * 3600; const m = Math.floor(s / 60);
  return `${h}h${String(m).padStart(2, "0")}m${String(s - m * 60).padStart(2, "0")}s`;
}
function dms(deg) {
  const sign = deg < 0 ? "−" : "+"; let s = Math.round(Math.abs(deg) * 3600);
  const d = Math.floor(s / 3600); s -= d * 3600; const m = Math.floor(s / 60);
  return `${sign}${d}°${String(m).padStart(2, "0")}′${String(s - m * 60).padStart(2, "0")}″`;
}
function arcsec(v) { return v == null ? "–" : v >= 120 ? `${num(v / 60, 1)}′` : `${num(v, 0)}″`; }

function renderPointing() {
  const s = P.solve, c = P.centring;
  if (s && s.ok) {
    $("solve-centre").textContent = `${hms(s.ra_deg)} ${dms(s.dec_deg)}`;
    $("solve-scale").textContent = `${num(s.scale_arcsec_px, 2)}″/px · ${num(s.rotation_deg, 1)}°`;
  } else {
    $("solve-centre").textContent = "–"; $("solve-scale").textContent = "–";
  }
  // Off target: the latest of the centring, the night's pointing check, the reference's solve.
  const err = c && c.error_arcsec != null ? c.error_arcsec
    : P.pointing && P.pointing.ok ? P.pointing.error_arcsec : s && s.ok ? s.error_arcsec : null;
  $("solve-error").textContent = arcsec(err);
  const notes = [];
  if (c) notes.push(`centring: ${c.state}${c.error_arcsec != null ? ` at ${arcsec(c.error_arcsec)}` : ""}`
    + (c.attempt ? ` (try ${c.attempt})` : "") + (c.reason ? ` — ${c.reason}` : ""));
  if (s && !s.ok) notes.push(`reference not solved: ${s.reason}`);
  else if (s) notes.push(`reference ${String(s.path || "").split("/").pop()} solved in ${num(s.elapsed_s, 1)} s`);
  if (P.pointing && P.pointing.far) notes.push(`drift: ${P.pointing.reason}`);
  $("solve-note").textContent = notes.join(" · ");
  const f = P.focus;
  $("focus-result").textContent = !f ? (P.live.length ? "focusing…" : "–")
    : f.ok ? `${num(f.hfr_px, 2)} px @ ${f.position}` : "failed";
  $("focus-note").textContent = !f ? "" : (f.ok ? `HFR ${num(f.hfr_px_start, 2)} → ${num(f.hfr_px, 2)} px`
    : `autofocus failed: ${f.reason}`) + (f.trigger ? ` · ${f.trigger}` : "");
  drawFocusCurve();
}

function drawFocusCurve() {
  const canvas = $("c-focus");
  const pts = (P.live.length ? P.live : (P.focus && P.focus.curve) || []).filter((p) => p.hfr_px != null);
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.max(1, Math.round(w * dpr)); canvas.height = Math.max(1, Math.round(h * dpr));
  canvas.dataset.n = pts.length;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0); g.clearRect(0, 0, w, h);
  g.strokeStyle = "#2a0804"; g.lineWidth = 1; g.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (!pts.length) return;
  const xs = pts.map((p) => p.position), ys = pts.map((p) => p.hfr_px);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = 0, y1 = Math.max(...ys) * 1.1;
  if (x1 - x0 < 1) { x0 -= 1; x1 += 1; }
  const pad = 18, X = (v) => pad + (v - x0) / (x1 - x0) * (w - 2 * pad), Y = (v) => h - 14 - (v - y0) / (y1 - y0) * (h - 28);
  g.fillStyle = "#7a1a12"; g.font = "11px system-ui";
  g.fillText(`${num(y1, 1)} px`, 3, 11); g.fillText(String(x0), pad, h - 2);
  const right = String(x1); g.fillText(right, w - pad - g.measureText(right).width, h - 2);
  g.fillStyle = "#d42a1e";
  [...pts].sort((a, b) => a.position - b.position).forEach((p) => g.fillRect(X(p.position) - 3, Y(p.hfr_px) - 3, 6, 6));
  const f = P.focus;
  if (!P.live.length && f && f.ok) {  // the chosen position: a vertical line
    g.strokeStyle = "#ff5040"; g.lineWidth = 1.5; g.beginPath();
    g.moveTo(X(f.position), 4); g.lineTo(X(f.position), h - 14); g.stroke();
  }
}

function pointingStatus(st) {  // from the status JSON (also after a reload of the page)
  if (st.solve !== undefined) P.solve = st.solve;
  if (st.pointing !== undefined) P.pointing = st.pointing;
  if (st.focus !== undefined) P.focus = st.focus;
  const plan = st.plan;
  if (plan && ["centering", "centered", "centering failed"].includes(plan.state)) P.centring = plan;
  renderPointing();
}

function pointingEvent(e) {  // a live acquisition event
  if (e.event === "solve") P.solve = e;
  else if (e.event === "pointing") P.pointing = e;
  else if (e.event === "focusing") P.live.push(e);
  else if (e.event === "autofocus") { P.focus = e; P.live = []; }
  else if (e.event === "plan" && ["centering", "centered", "centering failed"].includes(e.state)) P.centring = e;
  else return;
  renderPointing();
}

window.addEventListener("resize", drawFocusCurve);
