// The portmesh dashboard: polls /api/v1/status and redraws. No build step, no dependencies.
"use strict";

const POLL_MS = 500;

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function holder(pid, command) {
  if (!pid) return "";
  return `pid ${esc(pid)}${command ? ` <code>${esc(command)}</code>` : ""}`;
}

// A port as a link to what listens there, when it is a web port (the node says which): a port on
// the node's own host opens under the name this page was opened with.
function port(p, web, host, s) {
  const text = `<span class="mono">${p}</span>`;
  if (!web) return text;
  const name = host === s.host ? location.hostname : host;
  const where = name.includes(":") ? `[${name}]` : name;
  return `<a href="${esc(web)}://${esc(where)}:${p}/" target="_blank" rel="noopener" data-link="${p}">${text}</a>`;
}

function table(head, rows, optional = []) {
  const th = head.map((h, i) => `<th${optional.includes(i) ? ' class="optional"' : ""}>${h}</th>`).join("");
  const body = rows
    .map((r) => `<tr${r.attrs || ""}>${r.cells.map((c, i) => `<td${optional.includes(i) ? ' class="optional"' : ""}>${c}</td>`).join("")}</tr>`)
    .join("");
  return `<table><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}

function renderCluster(s) {
  const members = s.members
    .map((m) => `<span class="member${m.id === s.leader_id ? " leader" : ""}" data-role="${esc(m.role)}">${esc(m.addr)} · ${esc(m.role)}</span>`)
    .join("");
  const leader = s.leader_id ? "" : '<strong class="no-leader">no leader</strong> ';
  return `${leader}${members} <span>term ${s.term} · revision ${s.revision}</span>`;
}

function renderServices(s) {
  if (!s.services.length) return '<p class="empty">no services registered</p>';
  const groups = new Map();
  for (const svc of s.services) {
    const key = `${svc.project || "(no project)"}${svc.env ? ` · ${svc.env}` : ""}${svc.instance && svc.instance !== "default" ? ` · ${svc.instance}` : ""}`;
    if (!groups.has(key)) groups.set(key, new Map());
    const hosts = groups.get(key);
    if (!hosts.has(svc.host)) hosts.set(svc.host, []);
    hosts.get(svc.host).push(svc);
  }
  let out = "";
  for (const [project, hosts] of [...groups].sort()) {
    out += `<h3 class="project">${esc(project)}</h3>`;
    for (const [host, list] of [...hosts].sort()) {
      const rows = list
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((svc) => ({
          attrs: ` data-service="${esc(svc.name)}"`,
          cells: [
            `<strong>${esc(svc.name)}</strong>`,
            svc.ports.map((p) => `${esc(p.name)}=${port(p.port, p.web, svc.host, s)}`).join(" "),
            `<span class="badge ${esc(svc.status)}">${esc(svc.status)}</span>`,
            ago(s.now_ms - svc.registered_ms),
            holder(svc.pid, svc.command),
            esc(svc.output),
          ],
        }));
      out += `<div class="host">host <span class="mono">${esc(host)}</span></div>`;
      out += table(["service", "ports", "health", "up", "process", "last check"], rows, [4, 5]);
    }
  }
  return out;
}

function renderPools(s) {
  return s.pools
    .map((p) => {
      const pct = (n) => (p.size ? (100 * n) / p.size : 0);
      const shown = (x) => (x > 0 && x < 10 ? x.toFixed(1) : Math.round(x));
      const full = p.utilization >= 0.8 ? " full" : "";
      return `<div class="pool${full}" data-pool="${esc(p.name)}">
        <div class="label"><span><strong>${esc(p.name)}</strong> <span class="mono">${esc(p.ranges)}</span> ${p.team !== "default" ? `· ${esc(p.team)}` : ""}</span>
        <span class="num">${p.allocated} / ${p.size} (${shown(pct(p.allocated))} %)</span></div>
        <div class="bar" role="img" aria-label="${p.allocated} of ${p.size} allocated">
          <span class="used" style="width:${pct(p.allocated)}%"></span><span class="reserved" style="width:${pct(p.reserved)}%"></span><span class="cooling" style="width:${pct(p.cooling)}%"></span>
        </div></div>`;
    })
    .join("");
}

// Only leases at risk (less than half their TTL left: kept ones are renewed every third of it).
function renderLeases(s) {
  const list = s.leases.filter((l) => l.at_risk).sort((a, b) => a.remaining_ms - b.remaining_ms).slice(0, 10);
  if (!s.leases.length) return '<p class="empty">no leases</p>';
  if (!list.length) return `<p class="empty">${s.leases.length} lease${s.leases.length === 1 ? "" : "s"}, all renewed on time</p>`;
  return table(
    ["lease", "expires in", "ttl", "ports"],
    list.map((l) => ({ attrs: ` data-lease="${l.id}"`, cells: [`<span class="mono">${l.id}</span>`, ago(l.remaining_ms), ago(l.ttl_ms), l.ports.join(", ")] })),
  );
}

function renderAllocations(s) {
  if (!s.allocations.length) return '<p class="empty">no live allocations</p>';
  const rows = [...s.allocations]
    .sort((a, b) => a.port - b.port)
    .map((a) => ({
      attrs: ` data-port="${a.port}"${a.holder_gone && !a.lease_id ? " data-leaked" : ""}`,
      cells: [port(a.port, a.web, a.host, s), `${esc(a.service)}${mark(a)}`, esc(a.pool), esc(a.host), holder(a.pid, a.command), a.lease_id ? `<span class="mono">${a.lease_id}</span>` : "", esc(a.key || "")],
    }));
  return table(["port", "service", "pool", "host", "holder", "lease", "key"], rows, [4, 6]);
}

// An allocation whose process ended is marked: leaked when no lease will ever free it.
function mark(a) {
  if (!a.holder_gone) return "";
  if (a.lease_id) return ' <span class="badge warning" title="its process ended; the port comes back when its lease is not renewed">holder gone</span>';
  return ` <span class="badge critical" title="its process ended and no lease will free the port: portmesh release ${a.port}">leaked</span>`;
}

function renderConflicts(s) {
  if (!s.recent_conflicts.length) return '<p class="empty">no conflicts</p>';
  const rows = s.recent_conflicts.slice(0, 15).map((c) => ({
    cells: [`<span class="mono">${c.port}</span>`, esc(c.host), holder(c.pid, c.command) || "unknown process", esc(c.service), `${ago(s.now_ms - c.at_ms)} ago`],
  }));
  return table(["port", "host", "held by", "wanted by", "when"], rows);
}

function renderRecommendations(s) {
  return s.recommendations.map((r) => `<li data-rule="${esc(r.rule)}">${esc(r.reason)}<code>${esc(r.command)}</code></li>`).join("");
}

function set(id, html) {
  const el = document.getElementById(id);
  if (el.innerHTML !== html) el.innerHTML = html;
}

// A cluster with authentication wants a token: asked for in the page, kept for this tab only.
const TOKEN_KEY = "portmesh-token";

function authHeaders() {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? { Authorization: `Bearer ${t}` } : {};
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  refresh();
});

async function refresh() {
  try {
    const r = await fetch("/api/v1/status", { cache: "no-store", headers: authHeaders() });
    const form = document.getElementById("token-form");
    form.hidden = r.status !== 401;
    if (r.status === 401) {
      set("cluster", `<strong class="no-leader">token needed</strong> (${esc((await r.text()).trim())})`);
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const s = await r.json();
    set("cluster", renderCluster(s));
    set("services", renderServices(s));
    set("pools", renderPools(s));
    set("leases", renderLeases(s));
    set("allocations", renderAllocations(s));
    set("conflicts", renderConflicts(s));
    set("recommendations", renderRecommendations(s));
    document.getElementById("recommendations-section").hidden = s.recommendations.length === 0;
    document.getElementById("footer").textContent = `node ${s.node_id} · updated ${new Date(s.now_ms).toLocaleTimeString()}`;
    document.body.dataset.revision = s.revision;
  } catch (e) {
    set("cluster", `<strong class="no-leader">node unreachable</strong> (${esc(e.message)})`);
  }
}

refresh();
setInterval(refresh, POLL_MS);
