// The Model Library: the models of the current project and the shared ones, each with its
// production, canary (and its weight) and staging versions. GET /v1/registry/models answers
// every model the caller may see; the page keeps the current project's and the shared ones.
import { api, currentProject, onProjectChange } from "../api.js";
import { $, fmtAgo, fmtTime, h, replace, showError, table } from "../dom.js";

const PAGE = 20;
const SHOWN_ALIASES = ["production", "canary", "staging"];

const box = $("#models-table");
const error = $("#models-error");
const more = $("#models-more");
const filter = $("#models-filter");
const scope = $("#models-scope");

let models = [];
let projects = new Map(); // project id → name, of the projects the caller may read
let shown = PAGE;

function aliasText(alias) {
  if (!alias) return "—";
  const weight = alias.weight ? ` · ${Math.round(alias.weight * 1000) / 10}%` : "";
  return `v${alias.version}${weight}`;
}

function ownerText(owner) {
  if (owner === null) return "shared";
  return projects.get(owner) || owner;
}

function mine(model, project) {
  return !project || model.owner === null || model.owner === project.id;
}

function render() {
  const project = currentProject();
  const needle = filter.value.trim().toLowerCase();
  const rows = models.filter((m) => mine(m, project) && m.id.toLowerCase().includes(needle));
  scope.textContent = project
    ? `The models of ${project.name} and the models every project shares.`
    : "Every model you may see: choose a project to keep its own and the shared ones.";
  const columns = [
    { title: "Model", cell: (m) => h("a", { href: `/console/models/${encodeURIComponent(m.id)}`, "data-testid": "model-link" }, m.id) },
    { title: "Project", cell: (m) => ownerText(m.owner) },
    { title: "Latest", class: "num", cell: (m) => (m.latest_version ? `v${m.latest_version}` : "—") },
    ...SHOWN_ALIASES.map((name) => ({
      title: name,
      cell: (m) => h("span", { "data-testid": `models-alias-${name}` }, aliasText(m.aliases[name])),
    })),
    { title: "Other aliases", cell: (m) => Object.keys(m.aliases).filter((a) => !SHOWN_ALIASES.includes(a))
      .map((a) => `${a} ${aliasText(m.aliases[a])}`).join(", ") || "—" },
    { title: "Last move", cell: (m) => lastMove(m) },
  ];
  replace(box, table(columns, rows.slice(0, shown), {
    empty: needle ? "No model matches the filter." : "No models yet: push one with `aimass registry push`, or fine-tune one.",
    rowAttrs: (m) => ({ dataset: { model: m.id, testid: "model-row" } }),
  }));
  more.hidden = rows.length <= shown;
  more.textContent = `Show ${Math.min(PAGE, rows.length - shown)} more of ${rows.length - shown}`;
}

function lastMove(m) {
  const times = Object.values(m.aliases).map((a) => a.updated_at);
  if (!times.length) return "—";
  const at = Math.max(...times);
  return h("time", { datetime: new Date(at * 1000).toISOString(), title: fmtTime(at) }, fmtAgo(at));
}

async function load() {
  try {
    const [page, known] = await Promise.all([
      api("GET", "/v1/registry/models"),
      api("GET", "/v1/projects", { project: false }).catch(() => ({ data: [] })), // names only
    ]);
    models = page.data;
    projects = new Map(known.data.map((p) => [p.id, p.name]));
    error.hidden = true;
    render();
  } catch (err) {
    replace(box);
    showError(err, error);
  }
}

more.addEventListener("click", () => {
  shown += PAGE;
  render();
});
filter.addEventListener("input", () => {
  shown = PAGE;
  render();
});
onProjectChange(() => {
  shown = PAGE;
  render();
});
load();
