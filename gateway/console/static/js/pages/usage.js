// Usage: tokens and requests over time from GET /v1/usage (the same query a script makes),
// drawn as line charts, summed in a table, and offered as the API's CSV with the same filters.
import { api, currentProject, onProjectChange } from "../api.js";
import { lineChart } from "../chart.js";
import { $, fmtNumber, fmtTime, h, replace, setOptions, showError, table } from "../dom.js";

const RANGES = { hour: 3600, day: 86400, week: 7 * 86400, month: 30 * 86400 }; // seconds back from now
const BUCKET = { minute: 60, hour: 3600, day: 86400 }; // the API's group_by sizes (UTC buckets)
const MAX_BUCKETS = 10080; // the API's bound (controlplane/usage.py MAX_BUCKETS)
const MAX_LINES = 5; // lines per chart; the rest are summed as "Other" (the palette has 6)
const PAGE = 20; // totals rows shown at a time

const el = {
  form: $("#usage-filters"),
  range: $("#usage-range"),
  fromField: $("#usage-from-field"),
  toField: $("#usage-to-field"),
  from: $("#usage-from"),
  to: $("#usage-to"),
  group: $("#usage-group"),
  project: $("#usage-project"),
  key: $("#usage-key"),
  model: $("#usage-model"),
  series: $("#usage-series"),
  error: $("#usage-error"),
  csv: $("#usage-csv"),
  span: $("#usage-span"),
  empty: $("#usage-empty"),
  table: $("#usage-table"),
};

const seen = { keys: new Set(), models: new Set() }; // filter choices met so far
const keyNames = new Map(); // key id → name, where the caller may list the project's keys
let latest = 0; // the newest load: an older answer arriving late is dropped

// ── the query the form describes ──

// The default bucket for a span: enough points to see a shape, few enough to read.
function defaultGroup(seconds) {
  if (seconds <= 3 * 3600) return "minute";
  if (seconds <= 8 * 86400) return "hour";
  return "day";
}

const localTime = (value) => Math.floor(new Date(value).getTime() / 1000); // datetime-local is the viewer's zone

function span() {
  const range = el.range.value;
  if (range !== "custom") {
    const end = Math.floor(Date.now() / 1000);
    return { start: end - RANGES[range], end };
  }
  if (!el.from.value || !el.to.value) throw new Error("Choose both From and To for a custom range.");
  const start = localTime(el.from.value);
  const end = localTime(el.to.value);
  if (!(end > start)) throw new Error(`To (${el.to.value}) must be after From (${el.from.value}).`);
  return { start, end };
}

// Group-by choices that would ask for more buckets than the API answers are disabled.
function limitGroups(seconds) {
  for (const option of el.group.options) option.disabled = seconds / BUCKET[option.value] > MAX_BUCKETS;
  if (el.group.selectedOptions[0]?.disabled) el.group.value = defaultGroup(seconds);
}

function query({ start, end }) {
  const project = currentProject();
  return {
    project_id: project ? project.id : null,
    key_id: el.key.value || null,
    model: el.model.value || null,
    start_time: start,
    end_time: end,
    group_by: el.group.value,
  };
}

function csvHref(q) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== null && v !== "") params.append(k, String(v));
  params.append("format", "csv");
  return `/v1/usage?${params}`;
}

// ── drawing ──

const keyLabel = (id) => (id === "" ? "People (signed in)" : keyNames.has(id) ? `${keyNames.get(id)} (${id})` : id);
const tokensOf = (b) => b.prompt_tokens + b.completion_tokens;

function timeFormat(seconds) {
  const f = seconds <= 2 * 86400
    ? new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" })
    : new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
  return (t) => f.format(new Date(t * 1000));
}

// Lines by `by` ("total", "model" or "key"), every bucket of the span present (0 where the API
// left an empty one out), the biggest MAX_LINES by tokens and the rest as "Other".
function lines(data, by, { start, end }, size, value) {
  const name = by === "model" ? (b) => b.model : by === "key" ? (b) => keyLabel(b.key_id) : () => "All";
  const weight = new Map();
  for (const b of data) weight.set(name(b), (weight.get(name(b)) || 0) + tokensOf(b) + b.requests);
  const ranked = [...weight.keys()].sort((a, b) => weight.get(b) - weight.get(a));
  const kept = new Set(ranked.length > MAX_LINES + 1 ? ranked.slice(0, MAX_LINES) : ranked);
  const lineOf = (b) => (kept.has(name(b)) ? name(b) : "Other");
  const first = Math.floor(start / size) * size;
  const sums = new Map();
  for (const line of [...kept, ...(ranked.length > kept.size ? ["Other"] : [])]) {
    const buckets = new Map();
    for (let t = first; t < end; t += size) buckets.set(t, 0);
    sums.set(line, buckets);
  }
  for (const b of data) {
    const buckets = sums.get(lineOf(b));
    buckets.set(b.start_time, (buckets.get(b.start_time) || 0) + value(b));
  }
  return [...sums].map(([line, buckets]) => ({ name: line, points: [...buckets] }));
}

function totalsTable(data) {
  const rows = new Map();
  for (const b of data) {
    const id = `${b.project_id}\u0000${b.key_id}\u0000${b.model}`;
    const row = rows.get(id) || { model: b.model, key_id: b.key_id, requests: 0, prompt_tokens: 0, completion_tokens: 0, errors: 0 };
    for (const n of ["requests", "prompt_tokens", "completion_tokens", "errors"]) row[n] += b[n];
    rows.set(id, row);
  }
  const sorted = [...rows.values()].sort((a, b) => tokensOf(b) - tokensOf(a) || b.requests - a.requests);
  const total = { total: true, model: "All", key_id: null, requests: 0, prompt_tokens: 0, completion_tokens: 0, errors: 0 };
  for (const r of sorted) for (const n of ["requests", "prompt_tokens", "completion_tokens", "errors"]) total[n] += r[n];
  const num = (n) => ({ title: n[0], class: "num", cell: (r) => fmtNumber(n[1](r)) });
  const columns = [
    { title: "Model", cell: (r) => r.model },
    { title: "Key", cell: (r) => (r.total ? "" : keyLabel(r.key_id)) },
    num(["Requests", (r) => r.requests]),
    num(["Prompt tokens", (r) => r.prompt_tokens]),
    num(["Completion tokens", (r) => r.completion_tokens]),
    num(["Total tokens", tokensOf]),
    num(["Errors", (r) => r.errors]),
  ];
  let shown = PAGE;
  const render = () => {
    const page = sorted.slice(0, shown);
    const more = sorted.length > shown
      ? h("button", { type: "button", class: "secondary", dataset: { testid: "load-more" }, on: { click: () => { shown += PAGE; render(); } } },
        `Show more (${fmtNumber(sorted.length - shown)} left)`)
      : null;
    replace(el.table,
      table(columns, sorted.length ? [...page, total] : [], { empty: "No requests in this range.", rowAttrs: (r) => ({ class: r.total ? "usage-total" : null }) }),
      more);
  };
  render();
}

function draw(data, when, group) {
  const size = BUCKET[group];
  const by = el.series.value;
  const xFormat = timeFormat(when.end - when.start); // ticks in the viewer's zone
  const empty = data.length === 0;
  el.empty.hidden = !empty;
  lineChart($("#usage-chart-tokens"), { title: "Tokens (prompt + completion)", yLabel: "tokens", zero: true, xFormat,
    series: empty ? [] : lines(data, by, when, size, tokensOf) });
  lineChart($("#usage-chart-requests"), { title: "Requests", yLabel: "requests", zero: true, xFormat,
    series: empty ? [] : lines(data, by, when, size, (b) => b.requests) });
  totalsTable(data);
  const requests = data.reduce((n, b) => n + b.requests, 0);
  const tokens = data.reduce((n, b) => n + tokensOf(b), 0);
  const count = (n, what) => `${fmtNumber(n)} ${what}${n === 1 ? "" : "s"}`;
  el.span.textContent = `${fmtTime(when.start)} to ${fmtTime(when.end)}, by ${group}: ${count(requests, "request")}, ${count(tokens, "token")}.`;
}

// ── filter choices ──

function refreshChoices() {
  setOptions(el.key, [...seen.keys].sort().map((id) => ({ value: id, label: keyLabel(id) })), { placeholder: "All keys and people" });
  setOptions(el.model, [...seen.models].sort().map((m) => ({ value: m, label: m })), { placeholder: "All models" });
}

async function loadChoices() {
  keyNames.clear();
  seen.keys.clear();
  seen.models.clear();
  const project = currentProject();
  el.project.textContent = project ? project.name : "All your projects";
  const asks = [api("GET", "/v1/models").then(({ data }) => data.forEach((m) => seen.models.add(m.id)))];
  if (project) {
    // listing keys needs keys:manage: a member without it filters by the ids usage shows
    asks.push(api("GET", `/v1/projects/${encodeURIComponent(project.id)}/api_keys`).then(({ data }) => {
      for (const k of data) {
        keyNames.set(k.id, k.name || k.id);
        seen.keys.add(k.id);
      }
    }));
  }
  await Promise.allSettled(asks);
  refreshChoices();
}

// ── loading ──

async function load() {
  const mine = ++latest;
  replace(el.error);
  let when;
  try {
    when = span();
  } catch (err) {
    showError(err, el.error);
    return;
  }
  limitGroups(when.end - when.start);
  const q = query(when);
  el.csv.href = csvHref(q);
  el.csv.setAttribute("download", `usage-${q.group_by}.csv`);
  try {
    const page = await api("GET", "/v1/usage", { query: q });
    if (mine !== latest) return;
    for (const b of page.data) {
      seen.keys.add(b.key_id);
      seen.models.add(b.model);
    }
    refreshChoices();
    draw(page.data, { start: page.start_time, end: page.end_time }, page.group_by);
  } catch (err) {
    if (mine === latest) showError(err, el.error);
  }
}

function rangeChanged() {
  const custom = el.range.value === "custom";
  el.fromField.hidden = !custom;
  el.toField.hidden = !custom;
  if (custom && !el.from.value) {
    // start from the last day, in the viewer's zone, as datetime-local wants it
    const local = (t) => new Date((t - new Date(t * 1000).getTimezoneOffset() * 60) * 1000).toISOString().slice(0, 16);
    const now = Math.floor(Date.now() / 1000);
    el.from.value = local(now - 86400);
    el.to.value = local(now);
  }
  try {
    const { start, end } = span();
    el.group.value = defaultGroup(end - start);
  } catch {
    // an incomplete custom range: load() says what is missing
  }
  load();
}

el.range.addEventListener("change", rangeChanged);
for (const input of [el.from, el.to]) input.addEventListener("change", rangeChanged);
for (const select of [el.group, el.key, el.model]) select.addEventListener("change", load);
el.series.addEventListener("change", load);
el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
onProjectChange(async () => {
  el.key.value = "";
  await loadChoices();
  load();
});

el.group.value = defaultGroup(RANGES[el.range.value]);
loadChoices().then(load);
