// The console's one door to the API: every page calls /v1 through these functions, so a page
// can do exactly what a script with the same credentials can, and shows the API's own errors.

const PROJECT_KEY = "aimass.project";

export class ApiError extends Error {
  constructor(status, message, code = null, param = null, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
    this.body = body;
  }
}

function meta(name) {
  const el = document.querySelector(`meta[name="${name}"]`);
  return el ? el.getAttribute("content") : "";
}

export function csrfToken() {
  return meta("csrf-token");
}

export function me() {
  try {
    return JSON.parse(meta("me") || "null");
  } catch {
    return null;
  }
}

// ── the current project: chosen in the header, kept per browser ──

const listeners = new Set();

export function currentProject() {
  try {
    return JSON.parse(localStorage.getItem(PROJECT_KEY) || "null");
  } catch {
    return null;
  }
}

export function setProject(project) {
  if (project) localStorage.setItem(PROJECT_KEY, JSON.stringify({ id: project.id, name: project.name }));
  else localStorage.removeItem(PROJECT_KEY);
  for (const fn of listeners) fn(currentProject());
  document.dispatchEvent(new CustomEvent("aimass:project", { detail: currentProject() }));
}

export function onProjectChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

// Tells the header's switcher to read the project list again (after a create/rename/delete).
export function projectsChanged() {
  document.dispatchEvent(new CustomEvent("aimass:projects-changed"));
}

// ── requests ──

function url(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v === undefined || v === null || v === "") continue;
    params.append(k, String(v));
  }
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

function headersFor(method, { project = true, headers = {}, json } = {}) {
  const out = { Accept: "application/json", ...headers };
  if (method !== "GET" && method !== "HEAD") out["X-CSRF-Token"] = csrfToken();
  if (json !== undefined) out["Content-Type"] = "application/json";
  const p = currentProject();
  if (project && p) out["OpenAI-Project"] = p.id;
  return out;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page or an empty body
  }
  const err = body && body.error;
  if (err && err.message) return new ApiError(response.status, err.message, err.code, err.param, body);
  const text = `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, `The request failed: ${text}`, null, null, body);
}

function onUnauthenticated(response) {
  // the session ended (signed out elsewhere, expired): back to the sign-in page
  if (response.status === 401 && document.body.dataset.page !== "login" && document.body.dataset.page !== "setup") {
    const next = encodeURIComponent(location.pathname + location.search);
    location.assign(`/console/login?next=${next}`);
  }
}

export async function api(method, path, opts = {}) {
  const { json, form, body, query, signal } = opts;
  const init = { method, headers: headersFor(method, opts), credentials: "same-origin", signal };
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (form !== undefined) init.body = form;
  else if (body !== undefined) init.body = body;
  const response = await fetch(url(path, query), init);
  if (!response.ok) {
    onUnauthenticated(response);
    throw await errorOf(response);
  }
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export async function apiText(path, { query, headers = {}, project = true } = {}) {
  const response = await fetch(url(path, query), {
    headers: headersFor("GET", { project, headers: { Accept: "*/*", ...headers } }),
    credentials: "same-origin",
  });
  if (!response.ok) {
    onUnauthenticated(response);
    throw await errorOf(response);
  }
  return response.text();
}

// Reads a text/event-stream answer of a fetch (a POST such as a streamed chat completion):
// onEvent gets each event's data string ("[DONE]" included). Resolves when the stream ends.
export async function streamSSE(method, path, { json, onEvent, signal, project = true } = {}) {
  const response = await fetch(path, {
    method,
    headers: { ...headersFor(method, { project, json }), Accept: "text/event-stream" },
    credentials: "same-origin",
    body: json !== undefined ? JSON.stringify(json) : undefined,
    signal,
  });
  if (!response.ok) {
    onUnauthenticated(response);
    throw await errorOf(response);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onEvent(data);
    }
  }
}

// A live GET stream (server-sent events) with the session cookie; the caller closes it.
export function openEvents(path, onMessage, { query } = {}) {
  const source = new EventSource(url(path, query), { withCredentials: true });
  source.onmessage = (event) => onMessage(event.data, event);
  return source;
}

// An upload with progress (fetch has no upload progress): onProgress gets a fraction 0..1.
export function upload(path, formData, onProgress = () => {}, { project = true } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(headersFor("POST", { project }))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON
      }
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(body);
      } else {
        const err = body && body.error;
        reject(new ApiError(xhr.status, err ? err.message : `The upload failed: ${xhr.status} ${xhr.statusText}`, err && err.code, err && err.param, body));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "The upload failed: the connection was lost"));
    xhr.send(formData);
  });
}
