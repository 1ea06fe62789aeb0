// The pdserve dashboard: polls /dashboard/state and draws it with plain DOM and SVG (no library,
// no CDN). Latency history is kept in the page; P/D history comes from the store's decisions.
"use strict";

const REFRESH_MS = 2000;
const LATENCY_POINTS = 90;
const SVG = "http://www.w3.org/2000/svg";
const latencyHistory = [];

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits = 0, unit = "") {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)}${unit}`;
}

function pct(value) { return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`; }

function card(label, value, bad = false) {
  const c = el("div", {class: bad ? "card bad" : "card"});
  c.append(el("div", {class: "label"}, label), el("div", {class: "value"}, value));
  return c;
}

function defaultSlo(state) {
  const s = state.scenarios.find(x => x.name === "default") || state.scenarios[0];
  return s ? {ttft: s.ttft_slo_ms, tpot: s.tpot_slo_ms} : {ttft: null, tpot: null};
}

function renderCards(state) {
  const g = state.gateway, r = state.router || {}, slo = defaultSlo(state);
  const over = (v, limit) => v !== null && limit !== null && v > limit;
  document.getElementById("cards").replaceChildren(
    card("Requests/s (1 min)", fmt(g.requests_per_s, 2)),
    card("Rejected 429/503 (1 min)", String(g.rejected), g.rejected > 0),
    card("Failed 5xx (1 min)", String(g.failed), g.failed > 0),
    card(`TTFT p50 / p99 (SLO ${fmt(slo.ttft, 0, " ms")})`,
         `${fmt(g.ttft_ms.p50)} / ${fmt(g.ttft_ms.p99, 0, " ms")}`, over(g.ttft_ms.p99, slo.ttft)),
    card(`TPOT p50 / p99 (SLO ${fmt(slo.tpot, 0, " ms")})`,
         `${fmt(g.tpot_ms.p50, 1)} / ${fmt(g.tpot_ms.p99, 1, " ms")}`, over(g.tpot_ms.p99, slo.tpot)),
    card("Routed", fmt(r.routed)),
    card("Forwarded prefills", fmt(r.forwarded)),
    card("Prefilled on decode", fmt(r.local_prefills)),
    card("Router rejections", fmt(r.rejected), r.rejected > 0),
    card("Migrations", fmt(r.migrated)),
    card("Preemptions", fmt(r.preemptions)),
    card("Prefix cache hits", pct(r.prefix_hit_rate)),
  );
  const ic = state.iccache;
  if (ic) {
    document.getElementById("cards").append(
      card(`IC-Cache offloads to ${ic.small_model}${ic.paused ? " (paused)" : ""}`,
           ic.routed ? `${pct(ic.offloaded / ic.routed)} of ${ic.routed}` : "–"),
      card("IC-Cache examples", `${ic.num_examples} (${ic.num_evictions} evicted)`));
  }
}

function renderWorkers(state) {
  const rows = state.workers
    .slice().sort((a, b) => a.scenario.localeCompare(b.scenario) || a.role.localeCompare(b.role) || a.id.localeCompare(b.id))
    .map(w => {
      const tr = el("tr", {"data-worker": w.id});
      const health = !w.alive ? "dead" : w.draining ? "draining" : "healthy";
      const used = w.kv_total_blocks ? w.kv_used_blocks / w.kv_total_blocks : 0;
      const bar = el("span", {class: "bar", title: `${w.kv_used_blocks} of ${w.kv_total_blocks} blocks`});
      bar.append(el("i", {style: `width:${(used * 100).toFixed(0)}%`}));
      const kv = el("td");
      kv.append(bar, document.createTextNode(` ${(used * 100).toFixed(0)}%`));
      tr.append(el("td", {}, w.id), el("td", {}, w.scenario), el("td", {class: "role"}, w.role),
                el("td", {class: health}, health), el("td", {}, String(w.active_requests)), kv,
                el("td", {}, String(w.preemptions)), el("td", {}, pct(w.prefix_hit_rate)),
                el("td", {}, `${w.seconds_since_heartbeat.toFixed(1)} s ago`));
      return tr;
    });
  document.querySelector("#workers tbody").replaceChildren(...rows);
}

// A step line through (t, value) points on a chart of width W and height H.
function stepPath(points, x, y) {
  let d = "";
  points.forEach(([t, v], i) => {
    d += i === 0 ? `M${x(t)},${y(v)}` : `H${x(t)}V${y(v)}`;
  });
  return d;
}

function splitSeries(scenario, nowS) {
  // Each decision moved the split from `old` to `new`; the live counts end the series at now.
  const decisions = scenario.decisions;
  const start = decisions.length ? Math.min(decisions[0].at_unix_s, nowS - 60) : nowS - 300;
  const first = decisions.length ? decisions[0].old : [scenario.live.prefill, scenario.live.decode];
  const series = [[start, first]];
  for (const d of decisions) series.push([d.at_unix_s, d.new]);
  series.push([nowS, [scenario.live.prefill, scenario.live.decode]]);
  return series;
}

function renderSplitChart(scenario, nowS) {
  const W = 800, H = 160, pad = 28;
  const series = splitSeries(scenario, nowS);
  const t0 = series[0][0], maxN = Math.max(1, ...series.flatMap(([, v]) => v));
  const x = t => pad + (W - 2 * pad) * (t - t0) / Math.max(1, nowS - t0);
  const y = v => H - pad - (H - 2 * pad) * v / maxN;
  const svg = el("svg:svg", {class: "chart pd-chart", viewBox: `0 0 ${W} ${H}`, "data-scenario": scenario.name});
  svg.append(el("svg:path", {class: "prefill", d: stepPath(series.map(([t, v]) => [t, v[0]]), x, y)}),
             el("svg:path", {class: "decode", d: stepPath(series.map(([t, v]) => [t, v[1]]), x, y)}));
  for (const d of scenario.decisions) {
    const dot = el("svg:circle", {class: "decision", cx: x(d.at_unix_s), cy: pad / 2, r: 4});
    dot.append(el("svg:title", {}, `${new Date(d.at_unix_s * 1000).toLocaleTimeString()}: ` +
                                   `${d.old.join(":")} → ${d.new.join(":")}. ${d.reason}`));
    svg.append(dot);
  }
  svg.append(el("svg:text", {x: pad, y: H - 8}, new Date(t0 * 1000).toLocaleTimeString()),
             el("svg:text", {x: W - pad - 60, y: H - 8}, "now"),
             el("svg:text", {x: 4, y: y(maxN) + 4}, String(maxN)),
             el("svg:text", {x: W - 250, y: 14}, `prefill ${scenario.live.prefill} (blue), decode ${scenario.live.decode} (orange dashes)`));
  return svg;
}

function row(cells, attrs = {}) {
  const tr = el("tr");
  for (const [tag, text] of cells) tr.append(el(tag, attrs, text));
  return tr;
}

function renderDecisions(scenario) {
  const table = el("table", {class: "decisions"});
  table.append(row([["th", "When"], ["th", "P:D"], ["th", "Reason"]]));
  for (const d of scenario.decisions.slice(-8).reverse()) {
    table.append(row([["td", new Date(d.at_unix_s * 1000).toLocaleTimeString()],
                      ["td", `${d.old.join(":")} → ${d.new.join(":")}`], ["td", d.reason]]));
  }
  if (!scenario.decisions.length) {
    table.append(row([["td", "No ratio change yet: the controller has kept the initial split."]], {colspan: 3}));
  }
  return table;
}

function renderScenarios(state) {
  const blocks = state.scenarios.map(s => {
    const div = el("div", {class: "scenario"});
    const slo = `TTFT SLO ${fmt(s.ttft_slo_ms, 0, " ms")}, TPOT SLO ${fmt(s.tpot_slo_ms, 0, " ms")}`;
    const pinned = s.pinned ? `, pinned at ${s.pinned.join(":")}` : "";
    div.append(el("h3", {}, `${s.name}: ${s.live.prefill} prefill, ${s.live.decode} decode (${slo}${pinned})`),
               renderSplitChart(s, state.now_unix_s), renderDecisions(s));
    return div;
  });
  document.getElementById("scenarios").replaceChildren(...blocks);
}

function renderLatency(state) {
  const g = state.gateway, slo = defaultSlo(state);
  latencyHistory.push([state.now_unix_s, g.ttft_ms.p50, g.ttft_ms.p99]);
  if (latencyHistory.length > LATENCY_POINTS) latencyHistory.shift();
  const W = 800, H = 180, pad = 30;
  const values = latencyHistory.flatMap(([, a, b]) => [a, b]).filter(v => v !== null);
  const maxV = Math.max(1, slo.ttft || 0, ...values) * 1.1;
  const t0 = latencyHistory[0][0], t1 = Math.max(t0 + 1, state.now_unix_s);
  const x = t => pad + (W - 2 * pad) * (t - t0) / (t1 - t0);
  const y = v => H - pad - (H - 2 * pad) * v / maxV;
  const line = i => latencyHistory.filter(p => p[i] !== null).map((p, k) => `${k ? "L" : "M"}${x(p[0])},${y(p[i])}`).join("");
  const svg = document.getElementById("latency-chart");
  svg.replaceChildren(el("svg:path", {class: "p50", d: line(1)}), el("svg:path", {class: "p99", d: line(2)}),
                      el("svg:text", {x: 4, y: 14}, `TTFT p50 (green), p99 (purple), SLO (red dashes); top ${maxV.toFixed(0)} ms`));
  if (slo.ttft) svg.append(el("svg:path", {class: "slo", d: `M${pad},${y(slo.ttft)}H${W - pad}`}));
  for (const [t, p50, p99] of latencyHistory) {   // dots: a single sample is a point, not a line
    if (p50 !== null) svg.append(el("svg:circle", {class: "p50", cx: x(t), cy: y(p50), r: 2.5}));
    if (p99 !== null) svg.append(el("svg:circle", {class: "p99", cx: x(t), cy: y(p99), r: 2.5}));
  }
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/dashboard/state", {credentials: "same-origin", cache: "no-store"});
    if (resp.status === 401) { window.location.assign("/dashboard"); return; }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const state = await resp.json();
    document.getElementById("model").textContent = `model ${state.model}`;
    renderCards(state);
    renderLatency(state);
    renderScenarios(state);
    renderWorkers(state);
    status.className = state.router_error ? "status error" : "status";
    status.textContent = state.router_error || `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (err) {
    status.className = "status error";
    status.textContent = `cannot reach the gateway: ${err.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
