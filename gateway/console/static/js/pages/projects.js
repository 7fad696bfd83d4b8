// Projects: the caller's projects (GET /v1/projects), create one (it becomes the current
// project), rename (project admins and owners) and delete (owners); the API checks each.
import { api, currentProject, me, projectsChanged, setProject } from "../api.js";
import { $, fmtTime, h, notify, onSubmit, replace, showError, table } from "../dom.js";

const PAGE = 20;
const list = $("#projects");
const error = $("#projects-error");
const admin = Boolean(me()?.is_admin);
let projects = [];
let page = 0;

const canRename = (p) => admin || p.role === "admin" || p.role === "owner";
const canDelete = (p) => admin || p.role === "owner";

function renameForm(p) {
  const input = h("input", { id: `rename-${p.id}`, name: "name", value: p.name, maxlength: 100, required: true, "data-testid": "rename-project-name" });
  const fail = h("p", { class: "form-error", role: "alert", hidden: true });
  const form = h("form", { class: "inline-form" },
    h("label", { for: `rename-${p.id}`, class: "visually-hidden" }, `New name for ${p.name}`),
    input,
    h("button", { type: "submit", class: "secondary", "data-testid": "rename-project-button" }, "Rename"),
    fail);
  onSubmit(form, async (data) => {
    const renamed = await api("PATCH", `/v1/projects/${encodeURIComponent(p.id)}`, { json: { name: data.get("name") }, project: false });
    const current = currentProject();
    if (current && current.id === renamed.id) setProject(renamed);
    projectsChanged();
    notify(`Renamed to ${renamed.name}.`, "ok");
    await load();
  });
  return form;
}

async function remove(p) {
  if (!window.confirm(`Delete project ${p.name} with its members, keys, files and jobs? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/v1/projects/${encodeURIComponent(p.id)}`, { project: false });
    const current = currentProject();
    if (current && current.id === p.id) setProject(null);
    projectsChanged();
    notify(`Deleted ${p.name}.`, "ok");
    await load();
  } catch (err) {
    showError(err);
  }
}

function render() {
  const pages = Math.max(1, Math.ceil(projects.length / PAGE));
  page = Math.min(page, pages - 1);
  const rows = projects.slice(page * PAGE, (page + 1) * PAGE);
  const current = currentProject();
  replace(list,
    table([
      { title: "Name", cell: (p) => h("span", {}, p.name, current && current.id === p.id ? h("span", { class: "badge" }, " current") : null) },
      { title: "Id", cell: (p) => h("code", {}, p.id) },
      { title: "Your role", cell: (p) => p.role || (admin ? "platform admin" : "—") },
      { title: "Created", cell: (p) => fmtTime(p.created_at) },
      { title: "Actions", cell: (p) => h("div", { class: "actions" },
        current && current.id === p.id ? null : h("button", { type: "button", class: "secondary", on: { click: () => { setProject(p); projectsChanged(); render(); } } }, "Make current"),
        canRename(p) ? renameForm(p) : null,
        canDelete(p) ? h("button", { type: "button", class: "danger", "data-testid": "delete-project-button", on: { click: () => remove(p) } }, "Delete") : null) },
    ], rows, { empty: "No project yet: create one above.", rowAttrs: (p) => ({ "data-testid": "project-row", dataset: { projectId: p.id } }) }),
    pages > 1 ? h("div", { class: "pages" },
      h("button", { type: "button", class: "secondary", disabled: page === 0, on: { click: () => { page -= 1; render(); } } }, "Previous"),
      h("span", {}, `Page ${page + 1} of ${pages}`),
      h("button", { type: "button", class: "secondary", disabled: page >= pages - 1, on: { click: () => { page += 1; render(); } } }, "Next")) : null);
}

async function load() {
  try {
    projects = (await api("GET", "/v1/projects", { project: false })).data;
    error.hidden = true;
    render();
  } catch (err) {
    showError(err, error);
  }
}

const form = $("#project-form");
onSubmit(form, async (data) => {
  const created = await api("POST", "/v1/projects", { json: { name: data.get("name") }, project: false });
  setProject(created);
  projectsChanged();
  form.reset();
  notify(`Created ${created.name}; it is your current project now.`, "ok");
  await load();
});

load();
