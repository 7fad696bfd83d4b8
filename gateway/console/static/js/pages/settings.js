// Settings (platform admins): every setting of GET /v1/config, saved with PATCH /v1/config (only
// the changed ones; all or none apply); a project's quotas (GET/PATCH /v1/projects/{id}/quotas);
// people (GET/POST /v1/users, POST /v1/users/{id}/disable).
import { api } from "../api.js";
import { $, fmtNumber, fmtTime, h, notify, onSubmit, replace, setOptions, showError, table } from "../dom.js";

const PAGE = 20;
let settings = [];
let users = [];
let userPage = 0;

// ── platform settings ──

const show = (v) => (v === null ? "none" : typeof v === "number" ? fmtNumber(v) : String(v));

function bounds(s) {
  return s.type === "int" ? `${fmtNumber(s.min)} … ${fmtNumber(s.max)}` : `${fmtNumber(s.min)} … ${fmtNumber(s.max)} characters`;
}

function settingField(s) {
  const id = `setting-${s.key}`;
  const attrs = s.type === "int"
    ? { type: "number", min: s.min, max: s.max, step: 1 }
    : { type: "text", minlength: s.min, maxlength: s.max };
  return h("div", { class: "setting field" },
    h("label", { for: id }, s.key),
    h("input", { id, name: s.key, value: s.value === null ? "" : String(s.value), placeholder: s.nullable ? "none" : null,
      "aria-describedby": `${id}-help`, "data-testid": id, ...attrs }),
    h("p", { class: "setting-meta", id: `${id}-help` },
      s.description, ". ",
      `Default: ${show(s.default)}. Bounds: ${bounds(s)}.`,
      s.nullable ? " Empty: none (no limit, or no default)." : ""));
}

function parse(s, text) {
  const t = text.trim();
  if (t === "") return s.nullable ? null : t;
  if (s.type !== "int") return t;
  return /^-?\d+$/.test(t) ? Number(t) : t; // a non-number goes to the API, which names the setting and its bounds
}

async function loadSettings() {
  settings = (await api("GET", "/v1/config", { project: false })).data;
  replace($("#settings"), settings.map(settingField));
}

onSubmit($("#settings-form"), async (data) => {
  const changes = {};
  for (const s of settings) {
    const value = parse(s, data.get(s.key) ?? "");
    if (value !== s.value) changes[s.key] = value;
  }
  if (!Object.keys(changes).length) {
    notify("Nothing changed.");
    return;
  }
  settings = (await api("PATCH", "/v1/config", { json: changes, project: false })).data;
  replace($("#settings"), settings.map(settingField));
  notify(`Saved: ${Object.keys(changes).join(", ")}.`, "ok");
});

// ── project quotas ──

const quotaProject = $("#quota-project");

async function loadQuotas() {
  const form = $("#quotas-form");
  const error = form.querySelector(".form-error");
  if (!quotaProject.value) return;
  try {
    const q = await api("GET", `/v1/projects/${encodeURIComponent(quotaProject.value)}/quotas`, { project: false });
    $("#quota-day").value = q.tokens_per_day ?? "";
    $("#quota-month").value = q.tokens_per_month ?? "";
    error.hidden = true;
  } catch (err) {
    showError(err, error);
  }
}

async function loadProjects() {
  const { data } = await api("GET", "/v1/projects", { project: false });
  setOptions(quotaProject, data.map((p) => ({ value: p.id, label: `${p.name} (${p.id})` })));
  $("#quotas-form").querySelector("button[type=submit]").disabled = !data.length;
  await loadQuotas();
}

quotaProject.addEventListener("change", loadQuotas);

onSubmit($("#quotas-form"), async (data) => {
  const number = (name) => (data.get(name).trim() === "" ? null : Number(data.get(name)));
  const q = await api("PATCH", `/v1/projects/${encodeURIComponent(data.get("project"))}/quotas`, {
    json: { tokens_per_day: number("tokens_per_day"), tokens_per_month: number("tokens_per_month") },
    project: false,
  });
  notify(`Quotas saved: ${show(q.tokens_per_day)} tokens a day, ${show(q.tokens_per_month)} a month.`, "ok");
});

// ── people ──

async function disable(u) {
  if (!window.confirm(`Disable ${u.email}? They can no longer sign in, their sessions end and their keys are revoked.`)) return;
  try {
    await api("POST", `/v1/users/${encodeURIComponent(u.id)}/disable`, { project: false });
    notify(`Disabled ${u.email}.`, "ok");
  } catch (err) {
    showError(err);
  }
  await loadUsers();
}

function renderUsers() {
  const pages = Math.max(1, Math.ceil(users.length / PAGE));
  userPage = Math.min(userPage, pages - 1);
  const go = (delta) => () => { userPage += delta; renderUsers(); };
  replace($("#users"),
    table([
      { title: "Email", cell: (u) => u.email },
      { title: "Name", cell: (u) => u.display_name },
      { title: "Admin", cell: (u) => (u.is_admin ? "yes" : "no") },
      { title: "Created", cell: (u) => fmtTime(u.created_at) },
      { title: "Status", cell: (u) => (u.disabled_at === null ? h("span", { class: "status status-active" }, "active")
        : h("span", { class: "status status-revoked" }, `disabled ${fmtTime(u.disabled_at)}`)) },
      { title: "Actions", cell: (u) => (u.disabled_at === null
        ? h("button", { type: "button", class: "danger", "data-testid": "disable-user", on: { click: () => disable(u) } }, "Disable") : "") },
    ], users.slice(userPage * PAGE, (userPage + 1) * PAGE), { empty: "No people yet.", rowAttrs: (u) => ({ "data-testid": "user-row", dataset: { email: u.email } }) }),
    pages > 1 ? h("div", { class: "pages" },
      h("button", { type: "button", class: "secondary", disabled: userPage === 0, on: { click: go(-1) } }, "Previous"),
      h("span", {}, `Page ${userPage + 1} of ${pages}`),
      h("button", { type: "button", class: "secondary", disabled: userPage >= pages - 1, on: { click: go(1) } }, "Next")) : null);
}

async function loadUsers() {
  const error = $("#users-error");
  try {
    users = (await api("GET", "/v1/users", { project: false })).data;
    error.hidden = true;
    renderUsers();
  } catch (err) {
    showError(err, error);
  }
}

onSubmit($("#user-form"), async (data, form) => {
  const made = await api("POST", "/v1/users", {
    json: { email: data.get("email"), display_name: data.get("display_name"), password: data.get("password"), is_admin: data.get("is_admin") === "on" },
    project: false,
  });
  form.reset();
  notify(`Created ${made.email}.`, "ok");
  await loadUsers();
});

// ── the page ──

for (const [load, where] of [[loadSettings, $("#settings")], [loadProjects, $("#quotas-form .form-error")], [loadUsers, null]]) {
  load().catch((err) => showError(err, where));
}
