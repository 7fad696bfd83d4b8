// One model of the library: its aliases (and the gates each is held to), its versions with their
// lineage, the reports of two versions side by side, and its history. People who may move its
// aliases (the API's `can_write`: models:write in the owning project, a platform admin for a
// shared model) also get the promote form, which shows the gate results before anything moves,
// the canary weight and rollback. Every action is the /v1/registry route a script would call.
import { api } from "../api.js";
import { $, fmtNumber, fmtTime, h, notify, onSubmit, pager, replace, setOptions, showError, table } from "../dom.js";

const PAGE = 20; // versions per page
const name = $("#model-page").dataset.model;
const base = `/v1/registry/models/${encodeURIComponent(name)}`;
const pageError = $("#model-error");

let model = null; // GET /v1/registry/models/{name}
let versionPage = 0;
let events = null; // the history's pager
const manifests = new Map(); // version → manifest, for the comparison

// ── formatting ──

const pct = (x) => (x === null || x === undefined ? "—" : `${fmtNumber(x * 100, 2)}%`);
const short = (sha) => (sha ? h("span", { class: "mono", title: sha }, sha.slice(0, 12)) : "—");

function figure(x) {
  if (x === null || x === undefined) return "—";
  if (typeof x === "boolean") return x ? "yes" : "no";
  if (typeof x !== "number") return typeof x === "object" ? JSON.stringify(x) : String(x);
  if (Number.isInteger(x)) return fmtNumber(x);
  return Math.abs(x) >= 1000 ? fmtNumber(x, 1) : String(Number(x.toPrecision(4)));
}

function passBadge(passed) {
  if (passed === null || passed === undefined) return h("span", { class: "status" }, "no report");
  return h("span", { class: `status status-${passed ? "passed" : "failed"}` }, passed ? "passed" : "failed");
}

function jobLink(job) {
  return job ? h("a", { href: `/console/training/${encodeURIComponent(job)}` }, job) : "—";
}

function policyText(p) {
  const parts = [];
  if (p.parity) parts.push(p.targets ? `parity (${p.targets.join(", ")})` : "parity");
  const fidelity = [
    ["top-1 ≥", p.parity_min_top1_agreement], ["KL mean ≤", p.parity_max_kl_mean],
    ["KL p99 ≤", p.parity_max_kl_p99], ["ppl +", p.parity_max_ppl_increase],
  ].filter(([, v]) => v !== null && v !== undefined);
  if (fidelity.length) parts.push(`fidelity (${fidelity.map(([k, v]) => `${k} ${v}`).join(", ")})`);
  if (p.max_ppl_increase !== null && p.max_ppl_increase !== undefined) parts.push(`perplexity ≤ +${pct(p.max_ppl_increase)}`);
  const load = [["p95 ≤", p.loadtest_max_p95_ms, " ms"], ["errors ≤", p.loadtest_max_error_rate, ""], ["rps ≥", p.loadtest_min_rps, ""]]
    .filter(([, v]) => v !== null && v !== undefined);
  if (p.require_loadtest || load.length) parts.push(`load test${load.length ? ` (${load.map(([k, v, u]) => `${k} ${v}${u}`).join(", ")})` : ""}`);
  return parts.join(" · ") || "none";
}

// ── the model ──

async function load() {
  try {
    model = await api("GET", base);
    pageError.hidden = true;
  } catch (err) {
    showError(err, pageError);
    for (const id of ["#aliases", "#versions", "#compare", "#events"]) replace($(id));
    return false;
  }
  ownerLine();
  renderAliases();
  renderVersions();
  compareChoices();
  if (model.can_write) actions();
  return true;
}

async function ownerLine() {
  const line = $("#model-owner");
  if (model.owner === null) {
    line.textContent = "shared by every project";
    return;
  }
  line.textContent = `project ${model.owner}`;
  try {
    const project = await api("GET", `/v1/projects/${encodeURIComponent(model.owner)}`, { project: false });
    line.textContent = `project ${project.name}`;
  } catch {
    // a project the caller may not read (a platform admin's view of a deleted one): its id stays
  }
}

function renderAliases() {
  const rows = Object.entries(model.aliases).map(([alias, a]) => ({ alias, ...a }));
  replace($("#aliases"), table([
    { title: "Alias", cell: (a) => a.alias },
    { title: "Version", cell: (a) => h("span", { "data-testid": `alias-${a.alias}` }, `v${a.version}`) },
    { title: "Share", cell: (a) => (a.weight ? h("span", { "data-testid": `alias-${a.alias}-weight` }, pct(a.weight)) : "—") },
    { title: "Gates", cell: (a) => policyText(model.gates[a.alias] || model.default_gates) },
    { title: "Moved", cell: (a) => fmtTime(a.updated_at) },
    { title: "By", cell: (a) => h("span", { class: "mono" }, a.updated_by) },
    { title: "Earlier", cell: (a) => (a.history.length ? a.history.map((v) => `v${v}`).join(" → ") : "—") },
  ], rows, { empty: "No aliases yet: promote a version to give it one." }));
}

function aliasesOf(version) {
  return Object.entries(model.aliases).filter(([, a]) => a.version === version).map(([alias]) => alias);
}

function renderVersions() {
  const newest = [...model.versions].reverse();
  const pages = Math.max(1, Math.ceil(newest.length / PAGE));
  versionPage = Math.min(versionPage, pages - 1);
  const rows = newest.slice(versionPage * PAGE, (versionPage + 1) * PAGE);
  replace($("#versions"), table([
    { title: "Version", cell: (v) => `v${v.version}` },
    { title: "Aliases", cell: (v) => aliasesOf(v.version).join(", ") || "—" },
    { title: "Created", cell: (v) => fmtTime(v.created_at) },
    { title: "Pushed", cell: (v) => fmtTime(v.pushed_at) },
    { title: "Targets", cell: (v) => v.targets.join(", ") || "—" },
    { title: "Parity", cell: (v) => (v.problem ? h("span", { class: "status status-failed", title: v.problem }, "unreadable") : passBadge(v.parity_passed)) },
    { title: "Job", cell: (v) => jobLink(v.lineage && v.lineage.job) },
    { title: "Base model", cell: (v) => (v.lineage && v.lineage.base_model) || "—" },
    { title: "Dataset sha256", cell: (v) => short(v.lineage && v.lineage.dataset_sha256) },
    { title: "Training file sha256", cell: (v) => short(v.lineage && v.lineage.training_file_sha256) },
  ], rows, { empty: "No versions.", rowAttrs: (v) => ({ dataset: { version: v.version, testid: "version-row" } }) }));
  $("#versions-pages").hidden = pages <= 1;
  $("#versions-page").textContent = `Page ${versionPage + 1} of ${pages}`;
  $("#versions-prev").disabled = versionPage === 0;
  $("#versions-next").disabled = versionPage >= pages - 1;
}

$("#versions-prev").addEventListener("click", () => {
  versionPage -= 1;
  renderVersions();
});
$("#versions-next").addEventListener("click", () => {
  versionPage += 1;
  renderVersions();
});

// ── two versions' reports side by side ──

function versionOptions(select, { placeholder = null } = {}) {
  const items = [...model.versions].reverse().map((v) => {
    const aliases = aliasesOf(v.version);
    return { value: String(v.version), label: `v${v.version}${aliases.length ? ` (${aliases.join(", ")})` : ""}` };
  });
  setOptions(select, items, { placeholder });
}

function compareChoices() {
  const a = $("#compare-a");
  const b = $("#compare-b");
  const first = !a.options.length;
  versionOptions(a);
  versionOptions(b);
  const numbers = model.versions.map((v) => String(v.version));
  if (first && numbers.length) {
    a.value = numbers[numbers.length - 1];
    const production = model.aliases.production ? String(model.aliases.production.version) : null;
    b.value = production && production !== a.value ? production : numbers[Math.max(0, numbers.length - 2)];
  }
  compare();
}

async function manifest(version) {
  if (!manifests.has(version)) {
    const got = await api("GET", `${base}/versions/${version}`);
    manifests.set(version, got.manifest);
  }
  return manifests.get(version);
}

function reportRows(ma, mb) {
  const rows = [];
  const both = (label, read) => rows.push({ label, a: read(ma), b: read(mb) });
  const section = (label) => rows.push({ label, section: true });
  section("Lineage");
  both("Job", (m) => jobLink(m.lineage.job));
  both("Base model", (m) => m.lineage.base_model || "—");
  both("Dataset sha256", (m) => short(m.lineage.dataset_sha256));
  both("Training file sha256", (m) => short(m.lineage.training_file_sha256));
  both("Created", (m) => fmtTime(Date.parse(m.created_at) / 1000));
  const targets = [...new Set([...Object.keys(ma.reports.parity), ...Object.keys(mb.reports.parity)])].sort();
  for (const target of targets) {
    section(`Parity: ${target}`);
    const read = (field, fmt = figure) => (m) => {
      const r = m.reports.parity[target];
      return r ? fmt(r[field]) : "—";
    };
    both("passed", (m) => (m.reports.parity[target] ? passBadge(m.reports.parity[target].passed && !m.reports.parity[target].forced) : "—"));
    both("kl_mean", read("kl_mean"));
    both("top1_agreement", read("top1_agreement"));
    both("ppl_increase", read("ppl_increase", pct));
  }
  for (const [key, title] of [["eval", "Evaluation"], ["load_test", "Load test"], ["benchmark", "Benchmark"]]) {
    const fields = [...new Set([...Object.keys(ma.reports[key] || {}), ...Object.keys(mb.reports[key] || {})])].sort();
    if (!fields.length) continue;
    section(title);
    for (const field of fields) both(field, (m) => figure((m.reports[key] || {})[field]));
  }
  return rows;
}

async function compare() {
  const box = $("#compare");
  const error = $("#compare-error");
  const a = Number($("#compare-a").value);
  const b = Number($("#compare-b").value);
  if (!a || !b) {
    replace(box, h("p", { class: "empty" }, "No versions to compare."));
    return;
  }
  try {
    const [ma, mb] = await Promise.all([manifest(a), manifest(b)]);
    error.hidden = true;
    replace(box, table([
      { title: "", cell: (r) => (r.section ? h("strong", {}, r.label) : r.label) },
      { title: `v${a}`, cell: (r) => (r.section ? "" : r.a) },
      { title: `v${b}`, cell: (r) => (r.section ? "" : r.b) },
    ], reportRows(ma, mb), { rowAttrs: (r) => ({ class: r.section ? "compare-section" : null }) }));
  } catch (err) {
    replace(box);
    showError(err, error);
  }
}

$("#compare-a").addEventListener("change", compare);
$("#compare-b").addEventListener("change", compare);

// ── history ──

function renderEvents(rows) {
  return table([
    { title: "When", cell: (e) => fmtTime(e.created_at) },
    { title: "Who", cell: (e) => h("span", { class: "mono" }, e.who) },
    { title: "Action", cell: (e) => e.action + (e.forced ? " (forced)" : "") },
    { title: "Alias", cell: (e) => e.alias || "—" },
    { title: "Version", cell: (e) => (e.from_version ? `v${e.from_version} → v${e.version}` : e.version ? `v${e.version}` : "—") },
    { title: "Share", cell: (e) => (e.weight ? pct(e.weight) : "—") },
    { title: "Detail", cell: (e) => e.detail || e.gates.map((g) => `${g.gate} ${g.passed ? "passed" : "failed"}`).join(", ") || "—" },
  ], rows, { empty: "No events." });
}

function loadEvents() {
  if (events) return events.reload();
  events = pager({
    into: $("#events"),
    render: renderEvents,
    load: async (after) => {
      const page = await api("GET", `${base}/events`, { query: { after, limit: 20 } });
      return { data: page.data, has_more: page.has_more, last: page.last_id };
    },
  });
  return null;
}

// ── promote, canary, rollback: drawn for people who may move the aliases ──

let drawn = false;
let gateCheck = 0; // the latest check's number: an older answer arriving late is dropped

function actions() {
  if (!drawn) {
    $("#actions").append($("#actions-template").content.cloneNode(true));
    wire();
    drawn = true;
  }
  versionOptions($("#promote-version"));
  versionOptions($("#canary-version"));
  const names = [...new Set(["production", "canary", "staging", ...Object.keys(model.aliases), ...Object.keys(model.gates)])];
  replace($("#alias-names"), names.map((n) => h("option", { value: n })));
  const back = Object.entries(model.aliases).filter(([, a]) => a.history.length);
  setOptions($("#rollback-alias"), back.map(([alias, a]) => ({ value: alias, label: `${alias}: v${a.version} → v${a.history[a.history.length - 1]}` })),
    { placeholder: back.length ? null : "no alias has an earlier version" });
  $("#rollback-form button[type=submit]").disabled = !back.length;
  const canary = model.aliases.canary;
  if (canary) {
    $("#canary-version").value = String(canary.version);
    $("#canary-weight").value = String(canary.weight ?? 0);
  }
  checkGates();
}

function renderGates(results, note) {
  const list = $("#gates");
  replace(list, results.map((g) => h("li", { class: g.passed ? "gate-pass" : "gate-fail", dataset: { gate: g.gate, passed: String(g.passed) } },
    h("strong", {}, `${g.gate}: ${g.passed ? "passed" : "failed"}`), " — ", g.detail)));
  if (!results.length) list.append(h("li", {}, "The alias's policy checks nothing."));
  if (note) list.append(h("li", { class: "hint" }, note));
}

async function checkGates() {
  const version = $("#promote-version").value;
  const alias = $("#promote-alias").value.trim();
  const button = $("#promote-form button[type=submit]");
  const number = ++gateCheck;
  if (!version || !alias) {
    replace($("#gates"), h("li", { class: "hint" }, "Choose a version and an alias."));
    return;
  }
  button.disabled = true;
  replace($("#gates"), h("li", { class: "hint" }, "Checking…"));
  try {
    const check = await api("GET", `${base}/versions/${version}/gates`, { query: { alias } });
    if (number !== gateCheck) return;
    const against = check.current_version ? `Compared with v${check.current_version}, the version ${alias} points to now.` : `${alias} points to no version yet.`;
    renderGates(check.data, check.passed ? against : `${against} Promoting now would be refused.`);
  } catch (err) {
    if (number !== gateCheck) return;
    replace($("#gates"), h("li", { class: "gate-fail" }, err.message));
  } finally {
    if (number === gateCheck) button.disabled = false;
  }
}

async function moved(what) {
  notify(what, "ok");
  manifests.clear();
  await load();
  await loadEvents();
}

function wire() {
  let typing = null;
  $("#promote-version").addEventListener("change", checkGates);
  $("#promote-alias").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(checkGates, 300);
  });
  onSubmit($("#promote-form"), async (data) => {
    const body = { version: Number(data.get("version")), alias: String(data.get("alias")).trim() };
    let move;
    try {
      move = await api("POST", `${base}/promote`, { json: body });
    } catch (err) {
      if (err.body && Array.isArray(err.body.gates)) renderGates(err.body.gates, "The promotion was refused; nothing moved.");
      throw err;
    }
    await moved(move.changed ? `${name}@${move.alias} now points to v${move.version}.` : `${name}@${move.alias} already pointed to v${move.version}.`);
  });
  onSubmit($("#canary-form"), async (data) => {
    const weight = Number(data.get("weight"));
    const current = model.aliases.canary;
    const body = { version: Number(data.get("version")), weight, expect: current ? current.version : 0 };
    const move = await api("POST", `${base}/aliases/canary`, { json: body });
    await moved(`${name}@canary is v${move.version} with ${pct(weight)} of the traffic.`);
  });
  onSubmit($("#rollback-form"), async (data) => {
    const move = await api("POST", `${base}/rollback`, { json: { alias: String(data.get("alias")) } });
    await moved(`${name}@${move.alias} is back on v${move.version} (was v${move.from_version}).`);
  });
}

if (await load()) loadEvents();
