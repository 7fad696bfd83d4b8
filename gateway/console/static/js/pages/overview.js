// Overview: GET /v1/overview for the current project (or, for a platform admin who asks, the
// whole platform), redrawn every 10 s: the cards, two charts of the hour, the loaded models.
import { api, currentProject, me, onProjectChange } from "../api.js";
import { $, fmtDuration, fmtNumber, fmtTime, h, replace, showError, table } from "../dom.js";
import { lineChart } from "../chart.js";

const REFRESH_MS = 10_000;
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const minute = (t) => clock.format(new Date(t * 1000));

const all = $("#ov-all");
const error = $("#ov-error");
const requestsChart = lineChart($("#ov-requests-chart"), {
  title: "Requests per minute", xLabel: "time", yLabel: "requests", xFormat: minute, zero: true,
});
const tokensChart = lineChart($("#ov-tokens-chart"), {
  title: "Tokens per minute (prompt + completion)", xLabel: "time", yLabel: "tokens", xFormat: minute, zero: true,
});
let timer = null;

function scope() {
  const project = currentProject();
  if ((all && all.checked) || !project) return { query: {}, label: me()?.is_admin ? "The whole platform." : "All your projects." };
  return { query: { project_id: project.id }, label: `Project ${project.name}.` };
}

function render(o) {
  const hour = o.minutes.reduce((sum, m) => ({ requests: sum.requests + m.requests, tokens: sum.tokens + m.tokens }), { requests: 0, tokens: 0 });
  replace($("#ov-models"), fmtNumber(o.models.length));
  replace($("#ov-rpm"), fmtNumber(o.requests_per_minute));
  replace($("#ov-rpm-hour"), `${fmtNumber(hour.requests)} in the hour`);
  replace($("#ov-tpm"), fmtNumber(o.tokens_per_minute));
  replace($("#ov-tpm-hour"), `${fmtNumber(hour.tokens)} in the hour`);
  const ttft = o.time_to_first_token;
  replace($("#ov-ttft-p50"), fmtDuration(ttft.p50_s));
  replace($("#ov-ttft-p95"), fmtDuration(ttft.p95_s));
  replace($("#ov-ttft-n"), `over ${fmtNumber(ttft.requests)} ${ttft.requests === 1 ? "generation" : "generations"}`);
  replace($("#ov-error-rate"), o.error_rate === null ? "—" : `${fmtNumber(o.error_rate * 100, 2)} %`);
  replace($("#ov-jobs"), `${fmtNumber(o.jobs.running)} · ${fmtNumber(o.jobs.queued)}`);
  requestsChart.update([{ name: "requests", points: o.minutes.map((m) => [m.start_time, m.requests]) },
    { name: "errors", points: o.minutes.map((m) => [m.start_time, m.errors]) }]);
  tokensChart.update([{ name: "tokens", points: o.minutes.map((m) => [m.start_time, m.tokens]) }]);
  replace($("#ov-models-table"), table([
    { title: "Model", cell: (m) => m.name },
    { title: "Version", cell: (m) => String(m.version), class: "num" },
    { title: "Health", cell: (m) => h("span", { class: `status status-${m.health === "ok" ? "active" : "error"}`, title: m.detail || null }, m.health) },
    { title: "Loaded since", cell: (m) => fmtTime(m.loaded_at) },
    { title: "In flight", cell: (m) => fmtNumber(m.in_flight), class: "num" },
  ], o.models, { empty: "No model is loaded: a model loads with its first request." }));
  replace($("#ov-updated"), `Updated ${fmtTime(o.created_at)}`);
}

async function refresh() {
  clearTimeout(timer);
  const { query, label } = scope();
  replace($("#ov-scope"), label);
  try {
    render(await api("GET", "/v1/overview", { query, project: false }));
    error.hidden = true;
  } catch (err) {
    showError(err, error);
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

if (all) all.addEventListener("change", refresh);
onProjectChange(refresh);
refresh();
