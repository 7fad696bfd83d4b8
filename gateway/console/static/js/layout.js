// The header every page shares: the project switcher, sign-out, and the menu on narrow screens.
import { api, currentProject, me, setProject } from "./api.js";
import { h, replace, showError } from "./dom.js";

const switcher = document.getElementById("project-switcher");

async function loadProjects() {
  if (!switcher) return;
  try {
    const { data } = await api("GET", "/v1/projects", { project: false });
    const current = currentProject();
    replace(switcher,
      data.length ? null : h("option", { value: "" }, "No project yet"),
      data.map((p) => h("option", { value: p.id }, p.name)));
    const keep = current && data.find((p) => p.id === current.id);
    const chosen = keep || data[0] || null;
    if (chosen) switcher.value = chosen.id;
    // the name may have changed, or the project gone: store what is true now
    if (!current || !keep || keep.name !== current.name) setProject(chosen);
    switcher.projects = data;
  } catch (err) {
    showError(err);
  }
}

if (switcher) {
  switcher.addEventListener("change", () => {
    const chosen = (switcher.projects || []).find((p) => p.id === switcher.value) || null;
    setProject(chosen);
  });
  document.addEventListener("aimass:projects-changed", loadProjects);
  if (me()) loadProjects();
}

const signOut = document.getElementById("sign-out");
if (signOut) {
  signOut.addEventListener("click", async () => {
    try {
      await api("POST", "/v1/auth/logout", { project: false });
    } finally {
      location.assign("/console/login");
    }
  });
}

const toggle = document.getElementById("nav-toggle");
const nav = document.getElementById("nav");
if (toggle && nav) {
  toggle.addEventListener("click", () => {
    const open = toggle.getAttribute("aria-expanded") !== "true";
    toggle.setAttribute("aria-expanded", String(open));
    nav.classList.toggle("open", open);
  });
}
