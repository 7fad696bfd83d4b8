// Members and API keys of the current project. The caller's role (GET /v1/projects/{id}) decides
// which controls are drawn; the API decides what is allowed.
//   viewer     the members list
//   developer  + create keys (at most their own role)
//   admin      + add, re-role and remove members; list and revoke keys
//   owner      + make and unmake owners
import { api, currentProject, me, onProjectChange } from "../api.js";
import { $, copyButton, fmtTime, h, notify, onSubmit, replace, setOptions, showError, table } from "../dom.js";

const ROLES = ["viewer", "developer", "admin", "owner"];
const PAGE = 20;
const rank = (role) => ROLES.indexOf(role);

let project = null;
let role = null; // the caller's role in the project; a platform admin counts as an owner
let members = [];
let keys = [];
const pageOf = { members: 0, keys: 0 };

const body = $("#members-body");
const pageError = $("#members-page-error");
const memberForm = $("#member-form");
const keyForm = $("#key-form");
const newKeyBox = $("#new-key-box");

const path = (...parts) => `/v1/projects/${[project.id, ...parts].map(encodeURIComponent).join("/")}`;
const manages = () => rank(role) >= rank("admin");

function roleOptions(select, most, { keepFirst = false } = {}) {
  const items = ROLES.filter((r) => rank(r) <= rank(most)).map((r) => ({ value: r, label: r }));
  setOptions(select, items, { placeholder: keepFirst ? "mine (the default)" : null });
}

// Client-side pages of PAGE rows (the API answers the whole list): the rows of the current
// page, and Previous/Next controls (null when one page holds them all).
function paged(which, rows, redraw) {
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  pageOf[which] = Math.min(pageOf[which], pages - 1);
  const at = pageOf[which];
  const go = (delta) => () => { pageOf[which] += delta; redraw(); };
  const controls = pages > 1 ? h("div", { class: "pages" },
    h("button", { type: "button", class: "secondary", disabled: at === 0, on: { click: go(-1) } }, "Previous"),
    h("span", {}, `Page ${at + 1} of ${pages} (${rows.length})`),
    h("button", { type: "button", class: "secondary", disabled: at >= pages - 1, on: { click: go(1) } }, "Next")) : null;
  return [rows.slice(at * PAGE, (at + 1) * PAGE), controls];
}

// ── members ──

function roleCell(m) {
  const editable = manages() && (m.role !== "owner" || role === "owner");
  if (!editable) return m.role;
  const id = `role-${m.user_id}`;
  const select = h("select", { id, "data-testid": "member-role-select" },
    ROLES.filter((r) => r !== "owner" || role === "owner").map((r) => h("option", { value: r, selected: r === m.role }, r)));
  select.value = m.role;
  select.addEventListener("change", async () => {
    select.disabled = true;
    try {
      await api("PATCH", path("members", m.user_id), { json: { role: select.value } });
      notify(`${m.email} is ${select.value} now.`, "ok");
    } catch (err) {
      showError(err);
    } finally {
      await loadMembers();
    }
  });
  return h("span", {}, h("label", { for: id, class: "visually-hidden" }, `Role of ${m.email}`), select);
}

async function removeMember(m) {
  if (!window.confirm(`Remove ${m.email} from ${project.name}? Their keys of this project are revoked.`)) return;
  try {
    await api("DELETE", path("members", m.user_id));
    notify(`Removed ${m.email}.`, "ok");
  } catch (err) {
    showError(err);
  }
  await loadMembers();
}

function renderMembers() {
  const removable = (m) => manages() && (m.role !== "owner" || role === "owner");
  const [rows, controls] = paged("members", members, renderMembers);
  replace($("#members"), table([
    { title: "Email", cell: (m) => m.email },
    { title: "Name", cell: (m) => m.display_name },
    { title: "Role", cell: roleCell },
    { title: "Added", cell: (m) => fmtTime(m.created_at) },
    ...(manages() ? [{ title: "Actions", cell: (m) => removable(m)
      ? h("button", { type: "button", class: "danger", "data-testid": "remove-member", on: { click: () => removeMember(m) } }, "Remove") : "" }] : []),
  ], rows, { empty: "No members.", rowAttrs: (m) => ({ "data-testid": "member-row", dataset: { email: m.email } }) }), controls);
}

async function loadMembers() {
  const error = $("#members-error");
  try {
    members = (await api("GET", path("members"))).data;
    error.hidden = true;
    renderMembers();
  } catch (err) {
    replace($("#members"));
    showError(err, error);
  }
}

onSubmit(memberForm, async (data) => {
  const added = await api("POST", path("members"), { json: { email: data.get("email"), role: data.get("role") } });
  memberForm.reset();
  roleOptions($("#member-role"), role);
  $("#member-role").value = "developer";
  notify(`Added ${added.email} as ${added.role}.`, "ok");
  await loadMembers();
});

// ── keys ──

function keyStatus(k, now) {
  if (k.revoked_at !== null) return h("span", { class: "status status-revoked" }, `revoked ${fmtTime(k.revoked_at)}`);
  if (k.expires_at !== null && k.expires_at <= now) return h("span", { class: "status status-failed" }, "expired");
  return h("span", { class: "status status-active" }, "active");
}

async function revoke(k) {
  if (!window.confirm(`Revoke key aim_${k.id} (${k.name || "unnamed"})? Programs using it stop at once. This cannot be undone.`)) return;
  try {
    await api("DELETE", path("api_keys", k.id));
    notify(`Revoked aim_${k.id}.`, "ok");
  } catch (err) {
    showError(err);
  }
  await loadKeys();
}

function renderKeys() {
  const now = Date.now() / 1000;
  const [rows, controls] = paged("keys", keys, renderKeys);
  replace($("#keys"),
    table([
      { title: "Key", cell: (k) => h("code", {}, `aim_${k.id}_…`) },
      { title: "Name", cell: (k) => k.name || "—" },
      { title: "Scopes", cell: (k) => k.scopes.join(", ") },
      { title: "Role", cell: (k) => k.role },
      { title: "Created", cell: (k) => fmtTime(k.created_at) },
      { title: "Last used", cell: (k) => (k.last_used_at === null ? "never" : fmtTime(k.last_used_at)) },
      { title: "Expires", cell: (k) => (k.expires_at === null ? "never" : fmtTime(k.expires_at)) },
      { title: "Status", cell: (k) => keyStatus(k, now) },
      { title: "Actions", cell: (k) => (k.revoked_at === null
        ? h("button", { type: "button", class: "danger", "data-testid": "revoke-key", on: { click: () => revoke(k) } }, "Revoke") : "") },
    ], rows, { empty: "No API keys yet.", rowAttrs: (k) => ({ "data-testid": "key-row", dataset: { keyId: k.id } }) }),
    controls);
}

async function loadKeys() {
  const error = $("#keys-error");
  if (!manages()) {
    replace($("#keys"), h("p", { class: "muted" }, "Listing and revoking this project's keys needs a project admin or owner."));
    return;
  }
  try {
    keys = (await api("GET", path("api_keys"))).data.slice().reverse(); // newest first
    error.hidden = true;
    renderKeys();
  } catch (err) {
    replace($("#keys"));
    showError(err, error);
  }
}

function showNewKey(created) {
  replace($("#new-key"), created.key);
  replace($("#new-key-actions"), copyButton(created.key, "Copy key"),
    h("button", { type: "button", class: "secondary", on: { click: () => { replace($("#new-key")); newKeyBox.hidden = true; } } }, "I have copied it"));
  newKeyBox.hidden = false;
  newKeyBox.scrollIntoView({ block: "nearest" });
}

onSubmit(keyForm, async (data) => {
  const scopes = data.getAll("scopes");
  const days = data.get("expires_in_days");
  const json = { scopes, name: data.get("name") || null, role: data.get("role") || null };
  if (days !== "") json.expires_in_days = Number(days);
  const created = await api("POST", path("api_keys"), { json });
  keyForm.reset();
  showNewKey(created);
  await loadKeys();
});

// ── the page ──

async function load() {
  project = currentProject();
  replace($("#new-key"));
  newKeyBox.hidden = true;
  if (!project) {
    body.hidden = true;
    replace($("#members-scope"), "Choose a project in the header, or create one on the Projects page.");
    return;
  }
  replace($("#members-scope"), `Project ${project.name}.`);
  try {
    const p = await api("GET", `/v1/projects/${encodeURIComponent(project.id)}`);
    role = me()?.is_admin ? "owner" : p.role || "viewer";
    pageError.hidden = true;
  } catch (err) {
    body.hidden = true;
    showError(err, pageError);
    return;
  }
  body.hidden = false;
  memberForm.hidden = !manages();
  keyForm.hidden = rank(role) < rank("developer");
  if (manages()) {
    roleOptions($("#member-role"), role);
    $("#member-role").value = "developer";
  }
  roleOptions($("#key-role"), role, { keepFirst: true });
  pageOf.members = 0;
  pageOf.keys = 0;
  await Promise.all([loadMembers(), loadKeys()]);
}

onProjectChange(load);
load();
