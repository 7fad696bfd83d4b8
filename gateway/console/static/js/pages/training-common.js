// What the datasets, training and job pages share: the project they act in, whether the viewer
// may change things there, and how a status or a produced model is shown.
import { api, currentProject, me, onProjectChange } from "../api.js";
import { h } from "../dom.js";

const WRITERS = ["developer", "admin", "owner"];

// Resolves once the header's switcher has settled on a project (at once when one is stored), so
// a first visit does not ask the API without one; after `waitMs` it goes on regardless (the API
// then chooses, or says why it cannot).
export function whenProject(waitMs = 3000) {
  if (currentProject()) return Promise.resolve(currentProject());
  return new Promise((resolve) => {
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      off();
      resolve(currentProject());
    };
    const off = onProjectChange(finish);
    setTimeout(finish, waitMs);
  });
}

// Whether the viewer may upload, delete, start and cancel (files:write, jobs:write) in a project
// (the current one by default): a platform admin, or a member above viewer. The API checks it
// anyway; this only keeps controls away from those who would be refused.
export async function canWrite(projectId = currentProject() && currentProject().id) {
  const who = me();
  if (!who || who.is_admin) return true;
  if (!projectId) return true; // the API picks the project and answers for it
  try {
    const p = await api("GET", `/v1/projects/${encodeURIComponent(projectId)}`, { project: false });
    return WRITERS.includes(p.role);
  } catch {
    return false;
  }
}

export function statusBadge(status, attrs = {}) {
  return h("span", { class: `status status-${status}`, ...attrs }, status);
}

// A job's fine_tuned_model is NAME:VERSION; the Model Library's page is per name.
export function modelHref(ref) {
  const cut = ref.lastIndexOf(":");
  const name = cut > 0 ? ref.slice(0, cut) : ref;
  return `/console/models/${encodeURIComponent(name)}`;
}

export function jobHref(id) {
  return `/console/training/${encodeURIComponent(id)}`;
}

export const TERMINAL = ["succeeded", "failed", "cancelled"];
