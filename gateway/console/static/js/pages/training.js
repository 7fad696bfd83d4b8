// Training: the create-job form (a preset or a library model, the project's files, the
// hyperparameters with the bounds and defaults GET /v1/fine_tuning/options states) and the
// project's jobs.
import { api, onProjectChange } from "../api.js";
import { $, fmtBytes, fmtTime, h, onSubmit, pager, replace, setOptions, showError, table } from "../dom.js";
import { canWrite, jobHref, statusBadge, whenProject } from "./training-common.js";

const PAGE = 20; // jobs per page
const FILES_OFFERED = 100; // the newest files are offered in the selects

const form = $("#job-form");
const modelSelect = $("#job-model");
let options = null; // GET /v1/fine_tuning/options
let jobs = null;

// ── the form ──

const number = (v) => (Number.isInteger(v) ? v.toLocaleString() : String(v));

function bounds(p) {
  const low = p.minimum !== null && p.minimum !== undefined ? `from ${number(p.minimum)}`
    : p.exclusive_minimum !== null && p.exclusive_minimum !== undefined ? `above ${number(p.exclusive_minimum)}` : "";
  const high = p.maximum !== null && p.maximum !== undefined ? `up to ${number(p.maximum)}` : "";
  return [low, high].filter(Boolean).join(", ");
}

function hyperparameterField(p) {
  const id = `hp-${p.name}`;
  return h("div", { class: "field" },
    h("label", { for: id }, p.name),
    h("input", {
      id, name: `hp:${p.name}`, type: "number", placeholder: "auto",
      min: p.minimum ?? p.exclusive_minimum, max: p.maximum, step: p.type === "integer" ? "1" : "any",
      inputmode: p.type === "integer" ? "numeric" : "decimal",
      "aria-describedby": `${id}-hint`, "data-testid": id,
    }),
    h("p", { id: `${id}-hint`, class: "hint" },
      h("span", {}, `${p.description}. ${p.type === "integer" ? "An integer" : "A number"} ${bounds(p)}. `),
      h("span", { class: "hp-default", dataset: { name: p.name } })));
}

// The defaults differ between training a preset from scratch and fine-tuning a model.
function showDefaults() {
  if (!options) return;
  const fromScratch = options.presets.includes(modelSelect.value);
  for (const p of options.hyperparameters) {
    const value = fromScratch ? p.default : p.fine_tune_default;
    const el = $(`.hp-default[data-name="${p.name}"]`);
    if (el) el.textContent = value === null ? "Default: derived (see above)." : `Default: ${number(value)}${fromScratch ? "" : " when fine-tuning"}.`;
  }
}

async function loadOptions() {
  options = await api("GET", "/v1/fine_tuning/options");
  $("#job-seed").max = String(options.seed_maximum);
  replace($("#hyperparameters"), options.hyperparameters.map(hyperparameterField));
}

async function loadModels() {
  let models = [];
  try {
    const listed = await api("GET", "/v1/models");
    models = listed.data.map((m) => m.id).filter((id) => id !== "default"); // "default" names one of these
  } catch (err) {
    showError(err);
  }
  const keep = modelSelect.value;
  replace(modelSelect,
    h("optgroup", { label: "Train from scratch (preset)" }, options.presets.map((p) => h("option", { value: p }, p))),
    models.length ? h("optgroup", { label: "Fine-tune a model" }, models.map((id) => h("option", { value: id }, id))) : null);
  if ([...options.presets, ...models].includes(keep)) modelSelect.value = keep;
  showDefaults();
}

async function loadFiles() {
  const { data } = await api("GET", "/v1/files", { query: { purpose: "fine-tune", limit: FILES_OFFERED, order: "desc" } });
  const items = data.map((f) => ({ value: f.id, label: `${f.filename} · ${fmtBytes(f.bytes)} · ${f.id}` }));
  setOptions($("#job-training-file"), items, { placeholder: data.length ? "Choose a file" : "No files yet: upload one on the Datasets page" });
  setOptions($("#job-validation-file"), items, { placeholder: "None" });
}

modelSelect.addEventListener("change", showDefaults);

onSubmit(form, async (data) => {
  const body = { model: data.get("model"), training_file: data.get("training_file") };
  if (!body.training_file) throw new Error("Choose a training file (upload one on the Datasets page).");
  if (data.get("validation_file")) body.validation_file = data.get("validation_file");
  const suffix = String(data.get("suffix") || "").trim();
  if (suffix) body.suffix = suffix;
  if (data.get("seed") !== "") body.seed = Number(data.get("seed"));
  const hyperparameters = {};
  for (const p of options.hyperparameters) {
    const raw = data.get(`hp:${p.name}`);
    if (raw !== null && raw !== "") hyperparameters[p.name] = Number(raw);
  }
  if (Object.keys(hyperparameters).length) body.hyperparameters = hyperparameters;
  const job = await api("POST", "/v1/fine_tuning/jobs", { json: body });
  location.assign(jobHref(job.id)); // its page follows it live
});

// ── the list ──

const COLUMNS = [
  { title: "Job", cell: (j) => h("a", { href: jobHref(j.id) }, j.id) },
  { title: "Status", cell: (j) => statusBadge(j.status) },
  { title: "Model", cell: (j) => j.model },
  { title: "Created", cell: (j) => fmtTime(j.created_at) },
  // the job's page says how the model was made and links it to the Model Library
  { title: "Fine-tuned model", cell: (j) => (j.fine_tuned_model ? h("a", { href: jobHref(j.id) }, j.fine_tuned_model) : "—") },
];

function listJobs() {
  jobs = pager({
    into: $("#jobs"),
    load: async (after) => {
      const page = await api("GET", "/v1/fine_tuning/jobs", { query: { limit: PAGE, after } });
      return { data: page.data, has_more: page.has_more };
    },
    render: (rows, first) => (rows.length || first
      ? table(COLUMNS, rows, { empty: "No jobs yet.", rowAttrs: (j) => ({ dataset: { testid: "job-row", id: j.id } }) })
      : h("p", { class: "hint" }, "No more jobs.")),
  });
}

$("#jobs-refresh").addEventListener("click", () => jobs && jobs.reload());

// ── the project ──

async function load() {
  const writable = await canWrite();
  $("#create-job-card").hidden = !writable;
  $("#create-readonly").hidden = writable;
  listJobs();
  if (!writable) return;
  try {
    if (!options) await loadOptions();
    await Promise.all([loadModels(), loadFiles()]);
  } catch (err) {
    showError(err, form.querySelector(".form-error"));
  }
}

whenProject().then(() => {
  load();
  onProjectChange(load);
});
