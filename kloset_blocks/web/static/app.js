// The page of `kloset-blocks ui`: views over the JSON API (/api/openapi.json), routed by the URL
// fragment. Everything a backup holds reaches the page through textContent (never as HTML).
// The SQL editor is CodeMirror (vendor/editor.js, bundled from npm by `make deps`).
"use strict";

const main = document.getElementById("main");
const state = { snapshots: [], history: [], noticeSeen: 0, lastSnapshot: null, lastDb: null };

// ---- small DOM and API helpers --------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  const type = resp.headers.get("content-type") || "";
  const data = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) {
    let msg = data && data.error ? data.error : (typeof data === "string" ? data : JSON.stringify(data.detail || data));
    throw new Error(msg);
  }
  return data;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function alertBox() { return h("div", { role: "alert", class: "error" }); }
function showError(box, err) { box.textContent = err ? String(err.message || err) : ""; }

function size(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
}

function snapLink(s) { return h("a", { href: `#/s/${s.id}`, class: "mono" }, s.short_id); }

// A result as an accessible table: <th scope=col> headers, NULL shown as a muted "NULL".
function resultTable(columns, rows, { marks = null, select = null, caption = null } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, `no rows (columns: ${columns.join(", ")})`);
  const head = h("tr", {}, select ? h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Select")) : null,
    columns.map((c) => h("th", { scope: "col" }, c)));
  const body = rows.map((row, i) => {
    const cells = row.map((v) => (v === null ? h("td", { class: "null" }, "NULL") : h("td", {}, v)));
    const tr = h("tr", { class: marks && marks[i] ? "changed" : null },
      select ? h("td", {}, h("input", { type: "checkbox", "aria-label": `Select row ${i + 1}`, "data-row": i })) : null,
      cells);
    if (marks && marks[i]) tr.title = "differs from the older snapshot";
    return tr;
  });
  return h("div", { class: "scroll" }, h("table", {}, caption ? h("caption", { class: "sr-only" }, caption) : null,
    h("thead", {}, head), h("tbody", {}, body)));
}

function editor(parent, doc, onRun) {
  return window.KlosetEditor.create(parent, { label: "SQL", doc, onRun });
}

// ---- notices (idle and --max-open closes) ----------------------------------------------------

async function pollNotices() {
  for (;;) {
    try {
      const { notices } = await api(`/api/notices?after=${state.noticeSeen}`);
      if (notices.length) {
        state.noticeSeen = notices[notices.length - 1].n;
        document.getElementById("notices").textContent = notices[notices.length - 1].text;
      }
    } catch (e) { /* the server is gone or restarting; the views say so */ }
    await sleep(3000);
  }
}

// ---- Backups ---------------------------------------------------------------------------------

async function viewBackups() {
  const err = alertBox();
  const since = h("input", { type: "date", id: "since" });
  const until = h("input", { type: "date", id: "until" });
  const list = h("div");
  const load = async () => {
    showError(err, null);
    const q = new URLSearchParams();
    if (since.value) q.set("since", since.value);
    if (until.value) q.set("until", until.value);
    try {
      const data = await api(`/api/snapshots?${q}`);
      state.snapshots = data.snapshots;
      list.replaceChildren(snapshotTable(data.snapshots));
    } catch (e) { showError(err, e); }
  };
  main.replaceChildren(h("h2", {}, "Backups"),
    h("div", { class: "row" }, h("label", { for: "since" }, "From"), since, h("label", { for: "until" }, "to"), until,
      h("button", { onclick: load }, "Filter")),
    err, list);
  await load();
}

function snapshotTable(snaps) {
  if (!snaps.length) return h("p", { class: "muted" }, "No snapshot in that range.");
  const rows = snaps.map((s) => h("tr", {},
    h("td", {}, snapLink(s)), h("td", {}, s.date.replace("T", " ").replace("Z", " UTC")), h("td", { class: "num" }, size(s.size)),
    h("td", {}, s.pg_major ? `PostgreSQL ${s.pg_major}` : h("span", { class: "muted" }, s.problem || "")),
    h("td", {}, s.source), h("td", {}, s.state ? h("span", { class: `badge ${s.state}` }, s.state) : "")));
  return h("table", { class: "list" }, h("thead", {}, h("tr", {}, ["Snapshot", "Date", "Size", "PostgreSQL", "Source", "State"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows));
}

// ---- a snapshot: open it (phases live), then its databases and tables, and SQL ---------------

async function ensureOpen(id, phasesEl) {
  let s = await api(`/api/snapshots/${id}/open`, {});
  while (s.state === "opening") {
    if (phasesEl) phasesEl.replaceChildren(...phaseItems(s.phases));
    await sleep(250);
    s = await api(`/api/snapshots/${id}/session`);
  }
  if (phasesEl) phasesEl.replaceChildren(...phaseItems(s.phases));
  if (s.state !== "ready") throw new Error(s.error || `snapshot ${id.slice(0, 8)}: ${s.state}`);
  return s;
}

function phaseItems(phases) {
  return phases.map((p) => h("li", { class: p.seconds === null ? "running" : "done" },
    p.seconds === null ? `${p.name}…` : `${p.name} ${p.seconds.toFixed(2)} s`));
}

async function viewSnapshot(id) {
  const err = alertBox();
  const phases = h("ol", { class: "phases", "aria-label": "Phases" });
  const body = h("div");
  const closeBtn = h("button", { onclick: async () => { await api(`/api/snapshots/${id}/close`, {}); location.hash = "#/"; } }, "Close");
  main.replaceChildren(h("h2", {}, "Snapshot ", h("span", { class: "mono" }, id.slice(0, 8)), " ", closeBtn), phases, err, body);
  let s;
  try { s = await ensureOpen(id, phases); } catch (e) { showError(err, e); return; }
  state.lastSnapshot = id;
  let dbs;
  try { dbs = (await api(`/api/snapshots/${id}/databases`)).databases; } catch (e) { showError(err, e); return; }
  const pick = dbs.includes(state.lastDb) ? state.lastDb : (dbs.find((d) => d !== "postgres") || dbs[0]);
  const dbSel = h("select", { id: "database" }, dbs.map((d) => h("option", { value: d, selected: d === pick }, d)));
  const tables = h("div");
  const loadTables = async () => {
    state.lastDb = dbSel.value;
    try {
      const { tables: ts } = await api(`/api/snapshots/${id}/tables?database=${encodeURIComponent(dbSel.value)}`);
      tables.replaceChildren(tableList(id, dbSel.value, ts));
    } catch (e) { showError(err, e); }
  };
  dbSel.addEventListener("change", loadTables);
  const sqlPanel = h("section", { "aria-label": "Statement" });
  body.replaceChildren(h("div", { class: "row" }, h("label", { for: "database" }, "Database"), dbSel,
    h("span", { class: "muted" }, `PostgreSQL ${s.pg_major}`)),
  h("div", { class: "cols" }, h("section", { "aria-label": "Tables" }, h("h3", {}, "Tables"), tables), sqlPanel));
  buildSqlPanel(sqlPanel, id, () => dbSel.value);
  await loadTables();
}

function tableList(id, db, ts) {
  if (!ts.length) return h("p", { class: "muted" }, "No table.");
  return h("table", { class: "list" }, h("thead", {}, h("tr", {}, ["Table", "Kind", "Size", "Rows (est.)"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, ts.map((t) => h("tr", {},
      h("td", {}, h("a", { href: `#/s/${id}/t/${encodeURIComponent(db)}/${encodeURIComponent(t.schema)}/${encodeURIComponent(t.name)}` },
        t.schema === "public" ? t.name : `${t.schema}.${t.name}`)),
      h("td", {}, t.kind), h("td", { class: "num" }, size(t.bytes)),
      h("td", { class: "num" }, t.estimated_rows === null ? "?" : t.estimated_rows.toLocaleString("en"))))));
}

function buildSqlPanel(panel, id, getDb) {
  const err = alertBox();
  const status = h("p", { class: "status", role: "status" });
  const results = h("div");
  const history = h("ul", { class: "history", "aria-label": "History" });
  const edHost = h("div", { class: "editor" });
  const target = h("input", { id: "takeback-table", value: "public.restored", size: 24 });
  const takeOut = h("textarea", { rows: 6, readonly: true, "aria-label": "Take it back", hidden: true });
  let last = null; let runId = null;
  const run = async (explain = false) => {
    const sql = ed.get();
    showError(err, null);
    runId = crypto.randomUUID();
    runBtn.disabled = true; cancelBtn.disabled = false;
    status.textContent = "running…";
    if (!state.history.includes(sql)) { state.history.unshift(sql); renderHistory(); }
    try {
      const r = await api(`/api/snapshots/${id}/sql`, { database: getDb(), sql, explain, run_id: runId });
      last = { columns: r.columns, rows: r.rows };
      status.textContent = `${r.rows.length} row(s)${r.truncated ? ` (first ${r.cap}; export for all)` : ""} in ${r.seconds.toFixed(3)} s` +
        (r.status ? ` · ${r.status}` : "");
      results.replaceChildren(r.columns.length ? resultTable(r.columns, r.rows, { caption: "Result" }) : "");
    } catch (e) { status.textContent = ""; results.replaceChildren(); showError(err, e); }
    runBtn.disabled = false; cancelBtn.disabled = true;
  };
  const renderHistory = () => history.replaceChildren(...state.history.slice(0, 30).map((q) =>
    h("li", {}, h("button", { onclick: () => ed.set(q), title: "put back in the editor" }, q.length > 120 ? q.slice(0, 120) + "…" : q))));
  const exportHref = (fmt) => `/api/snapshots/${id}/export?` + new URLSearchParams({ database: getDb(), sql: ed.get(), format: fmt });
  const download = (fmt) => { const a = h("a", { href: exportHref(fmt), download: "" }); document.body.append(a); a.click(); a.remove(); };
  const takeBack = async (fmt) => {
    if (!last) return;
    try {
      takeOut.value = await api("/api/takeback", { table: target.value, columns: last.columns, rows: last.rows, format: fmt });
      takeOut.hidden = false;
    } catch (e) { showError(err, e); }
  };
  const runBtn = h("button", { class: "primary", onclick: () => run(false) }, "Run");
  const cancelBtn = h("button", { disabled: true, onclick: () => runId && api(`/api/cancel/${runId}`, {}) }, "Cancel");
  panel.replaceChildren(h("h3", {}, "SQL"), edHost,
    h("div", { class: "row" }, runBtn, cancelBtn, h("button", { onclick: () => run(true) }, "EXPLAIN"),
      h("button", { onclick: () => download("csv") }, "Export CSV"), h("button", { onclick: () => download("json") }, "Export JSON")),
    err, status, results,
    h("div", { class: "row" }, h("label", { for: "takeback-table" }, "Take it back into"), target,
      h("button", { onclick: () => takeBack("insert") }, "as INSERT"), h("button", { onclick: () => takeBack("copy") }, "as COPY")),
    takeOut, h("h3", {}, "History"), history);
  const ed = editor(edHost, state.history[0] || "SELECT * FROM pg_stat_database_conflicts LIMIT 5", () => run(false));
  renderHistory();
}

// ---- a table: columns, indexes, rows page by page (keyset) -----------------------------------

async function viewTable(id, db, schema, table) {
  const err = alertBox();
  const info = h("div");
  const rowsEl = h("div");
  const status = h("p", { class: "status", role: "status" });
  const takeOut = h("textarea", { rows: 6, readonly: true, "aria-label": "Take it back", hidden: true });
  const back = h("a", { href: `#/s/${id}` }, "← tables");
  main.replaceChildren(h("h2", {}, h("span", { class: "mono" }, id.slice(0, 8)), " · ", `${db} · ${schema}.${table}`), back, err, info, status, rowsEl, takeOut);
  try { await ensureOpen(id, null); } catch (e) { showError(err, e); return; }
  const keys = [];
  let page = null; let shown = [];
  const load = async (after) => {
    const q = new URLSearchParams({ database: db, limit: "100" });
    if (after) q.set("after", JSON.stringify(after));
    try {
      page = await api(`/api/snapshots/${id}/tables/${encodeURIComponent(schema)}/${encodeURIComponent(table)}?${q}`);
    } catch (e) { showError(err, e); return; }
    shown = page.rows;
    if (!info.firstChild) info.replaceChildren(describeTable(page.table));
    status.textContent = `rows ${keys.length * 100 + 1}–${keys.length * 100 + page.rows.length}, in ${page.key.join(", ")} order`;
    rowsEl.replaceChildren(resultTable(page.columns, page.rows, { select: true, caption: `${schema}.${table}` }),
      h("div", { class: "row" },
        h("button", { disabled: !keys.length, onclick: () => { keys.pop(); load(keys[keys.length - 1] || null); } }, "Previous page"),
        h("button", { disabled: !page.next, onclick: () => { keys.push(page.next); load(page.next); } }, "Next page"),
        h("button", { onclick: () => takeBack("insert") }, "Selected rows as INSERT"),
        h("button", { onclick: () => takeBack("copy") }, "Selected rows as COPY")));
  };
  const takeBack = async (fmt) => {
    const picked = [...rowsEl.querySelectorAll("input[type=checkbox]:checked")].map((c) => shown[Number(c.dataset.row)]);
    try {
      takeOut.value = await api("/api/takeback", { table: `${schema}.${table}`, columns: page.columns, rows: picked, format: fmt });
      takeOut.hidden = false;
    } catch (e) { showError(err, e); }
  };
  await load(null);
}

function describeTable(t) {
  return h("div", { class: "row" },
    h("div", {}, h("h3", {}, "Columns"), h("table", {}, h("thead", {}, h("tr", {}, ["Column", "Type", "Null"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, t.columns.map((c) => h("tr", {}, h("td", {}, c.name, t.primary_key.includes(c.name) ? h("span", { class: "badge" }, "key") : ""), h("td", {}, c.type), h("td", {}, c.nullable ? "yes" : "no")))))),
    h("div", {}, h("h3", {}, "Indexes"), t.indexes.length
      ? h("ul", {}, t.indexes.map((i) => h("li", {}, h("code", {}, i.definition))))
      : h("p", { class: "muted" }, "none")));
}

// ---- across backups ----------------------------------------------------------------------------

async function viewAcross() {
  const err = alertBox();
  if (!state.snapshots.length) {
    try { state.snapshots = (await api("/api/snapshots")).snapshots; } catch (e) { showError(err, e); }
  }
  const edHost = h("div", { class: "editor" });
  const dbIn = h("input", { id: "database", value: state.lastDb || "", placeholder: "postgres" });
  const picks = state.snapshots.map((s) => h("label", {}, h("input", { type: "checkbox", checked: true, value: s.id }), " ", snapLink(s), ` ${s.date.slice(0, 10)}`));
  const out = h("div");
  const status = h("p", { class: "status", role: "status" });
  let job = null;
  const run = async () => {
    showError(err, null);
    const snapshots = picks.map((l) => l.querySelector("input")).filter((c) => c.checked).map((c) => c.value);
    runBtn.disabled = true; stopBtn.disabled = false;
    try {
      job = await api("/api/across", { database: dbIn.value || "postgres", sql: ed.get(), snapshots });
      while (job.state === "running") {
        render(job);
        await sleep(300);
        job = await api(`/api/across/${job.id}`);
      }
      render(job);
      if (job.error) showError(err, job.error);
    } catch (e) { showError(err, e); }
    runBtn.disabled = false; stopBtn.disabled = true;
  };
  const render = (j) => {
    status.textContent = `${j.results.length} of ${j.snapshots.length} snapshot(s) in ${j.seconds.toFixed(1)} s` +
      (j.fetched_bytes ? ` · fetched ${size(j.fetched_bytes)} from the store` : "") + (j.state === "running" ? " · running…" : "");
    out.replaceChildren(...j.results.map((r) => h("section", { "aria-label": `Snapshot ${r.short_id}` },
      h("h3", {}, snapLink({ id: r.id, short_id: r.short_id }), ` ${r.date.replace("T", " ").replace("Z", " UTC")} · `,
        r.error ? "error" : `${r.rows.length} row(s)`,
        r.changed && r.changed.some(Boolean) ? h("span", { class: "badge" }, ` ${r.changed.filter(Boolean).length} new or changed vs the older snapshot`) : "",
        r.gone ? h("span", { class: "badge" }, ` ${r.gone} gone since the older snapshot`) : ""),
      r.error ? h("div", { role: "alert" }, r.error) : resultTable(r.columns, r.rows, { marks: r.changed, caption: `Snapshot ${r.short_id}` }))));
  };
  const runBtn = h("button", { class: "primary", onclick: run }, "Run");
  const stopBtn = h("button", { disabled: true, onclick: () => job && api(`/api/across/${job.id}/cancel`, {}) }, "Cancel");
  main.replaceChildren(h("h2", {}, "Across backups"),
    h("p", { class: "muted" }, "The same statement on every chosen snapshot, newest first; rows that the next older snapshot does not have are highlighted."),
    h("fieldset", {}, h("legend", {}, "Snapshots"), h("div", { class: "row" }, picks)),
    h("div", { class: "row" }, h("label", { for: "database" }, "Database"), dbIn),
    edHost, h("div", { class: "row" }, runBtn, stopBtn), err, status, out);
  const ed = editor(edHost, "SELECT id, name, email FROM customers WHERE id = 150", run);
}

// ---- diff ------------------------------------------------------------------------------------

async function viewDiff() {
  const err = alertBox();
  if (!state.snapshots.length) {
    try { state.snapshots = (await api("/api/snapshots")).snapshots; } catch (e) { showError(err, e); }
  }
  const older = [...state.snapshots].reverse();
  const opt = (sel) => older.map((s, i) => h("option", { value: s.id, selected: i === sel }, `${s.short_id} ${s.date.slice(0, 16).replace("T", " ")}`));
  const aSel = h("select", { id: "diff-a" }, opt(0));
  const bSel = h("select", { id: "diff-b" }, opt(Math.min(1, older.length - 1)));
  const dbIn = h("input", { id: "database", value: state.lastDb || "", placeholder: "postgres" });
  const tableIn = h("input", { id: "diff-table", value: "public.customers" });
  const phases = h("ol", { class: "phases", "aria-label": "Phases" });
  const status = h("p", { class: "status", role: "status" });
  const out = h("div");
  const run = async () => {
    showError(err, null); out.replaceChildren();
    const [schema, table] = tableIn.value.includes(".") ? tableIn.value.split(/\.(.*)/s) : ["public", tableIn.value];
    try {
      status.textContent = "opening the snapshots…";
      await ensureOpen(aSel.value, phases);
      await ensureOpen(bSel.value, phases);
      status.textContent = "comparing…";
      const d = await api("/api/diff", { a: aSel.value, b: bSel.value, database: dbIn.value || "postgres", schema, table });
      status.textContent = `${d.counts.added} added, ${d.counts.removed} removed, ${d.counts.changed} changed, ${d.counts.same} unchanged (by ${d.key.join(", ")})` +
        (d.truncated ? " · first differences only" : "");
      out.replaceChildren(
        h("h3", {}, `Removed (in ${aSel.value.slice(0, 8)}, not in ${bSel.value.slice(0, 8)})`), d.removed.length ? resultTable(d.columns, d.removed, { caption: "Removed" }) : h("p", { class: "muted" }, "none"),
        h("h3", {}, "Added"), d.added.length ? resultTable(d.columns, d.added, { caption: "Added" }) : h("p", { class: "muted" }, "none"),
        h("h3", {}, "Changed (after; changed cells in bold, before in the tooltip)"), d.changed.length ? changedTable(d) : h("p", { class: "muted" }, "none"));
    } catch (e) { status.textContent = ""; showError(err, e); }
  };
  main.replaceChildren(h("h2", {}, "Diff"),
    h("div", { class: "row" }, h("label", { for: "diff-a" }, "From"), aSel, h("label", { for: "diff-b" }, "to"), bSel,
      h("label", { for: "database" }, "Database"), dbIn, h("label", { for: "diff-table" }, "Table"), tableIn,
      h("button", { class: "primary", onclick: run }, "Compare")),
    phases, err, status, out);
}

function changedTable(d) {
  const head = h("tr", {}, d.columns.map((c) => h("th", { scope: "col" }, c)));
  const rows = d.changed.map((c) => h("tr", {}, c.after.map((v, i) => {
    const changed = c.columns.includes(d.columns[i]);
    const td = h("td", { class: changed ? "cell-changed" : (v === null ? "null" : null) }, v === null ? "NULL" : v);
    if (changed) td.title = `before: ${c.before[i] === null ? "NULL" : c.before[i]}`;
    return td;
  })));
  return h("div", { class: "scroll" }, h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

// ---- routing ---------------------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "s" && parts[1] && parts[2] === "t") return viewTable(parts[1], parts[3], parts[4], parts[5]);
  if (parts[0] === "s" && parts[1]) return viewSnapshot(parts[1]);
  if (parts[0] === "across") return viewAcross();
  if (parts[0] === "diff") return viewDiff();
  return viewBackups();
}

window.addEventListener("hashchange", route);
route();
pollNotices();
