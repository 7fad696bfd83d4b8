// Building the page from API data without ever parsing it as HTML: every string becomes a text
// node, so a model name or a log line holding "<script>" shows as text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "on") {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value" && "value" in el) {
      el.value = value;
    } else if (key === "checked" || key === "selected" || key === "disabled" || key === "hidden") {
      el[key] = Boolean(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

// ── notices and errors ──

export function notify(message, kind = "info") {
  const region = document.getElementById("notices");
  if (!region) return;
  const note = h("div", { class: `notice notice-${kind}`, role: kind === "error" ? "alert" : null },
    h("span", {}, message),
    h("button", { type: "button", class: "link", "aria-label": "Dismiss", on: { click: () => note.remove() } }, "×"));
  region.append(note);
  if (kind !== "error") setTimeout(() => note.remove(), 6000);
}

export function showError(err, where = null) {
  const message = err && err.message ? err.message : String(err);
  if (where) {
    replace(where, message);
    where.hidden = false;
  } else {
    notify(message, "error");
  }
}

// ── formatting, in the viewer's zone and locale ──

const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function fmtTime(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return "—";
  return timeFormat.format(new Date(unixSeconds * 1000));
}

export function fmtAgo(unixSeconds, now = Date.now() / 1000) {
  if (unixSeconds === null || unixSeconds === undefined) return "never";
  const s = Math.max(0, now - unixSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

export function fmtNumber(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${fmtNumber(n, i ? 1 : 0)} ${units[i]}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${fmtNumber(seconds, 1)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// ── tables and pages ──

// columns: [{title, cell: row => node | string, class?}]
export function table(columns, rows, { empty = "Nothing here yet.", rowAttrs = () => ({}) } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.title)))),
      h("tbody", {}, rows.map((row) => h("tr", rowAttrs(row), columns.map((c) => h("td", { class: c.class }, c.cell(row))))))));
}

// "Load more" over an API's after/has_more pages. load(after) → {data, has_more, last}; render(rows)
// → a node appended for each page. Returns {reload()}.
export function pager({ load, render, into, more = "Load more" }) {
  let after = null;
  const list = h("div", { class: "pager-pages" });
  const button = h("button", { type: "button", class: "secondary", hidden: true, dataset: { testid: "load-more" } }, more);
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  replace(into, list, error, button);

  async function next() {
    button.disabled = true;
    try {
      const page = await load(after);
      list.append(render(page.data, after === null));
      after = page.last ?? (page.data.length ? page.data[page.data.length - 1].id : null);
      button.hidden = !page.has_more;
      error.hidden = true;
    } catch (err) {
      showError(err, error);
    } finally {
      button.disabled = false;
    }
  }
  button.addEventListener("click", next);
  const reload = () => {
    after = null;
    clear(list);
    return next();
  };
  reload();
  return { reload };
}

// A form whose submit runs `action(formData, form)`; the button is disabled meanwhile and a
// failure shows the API's message in the form's .form-error element.
export function onSubmit(form, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = form.querySelector(".form-error");
    if (error) {
      clear(error);
      error.hidden = true;
    }
    const buttons = Array.from(form.querySelectorAll("button[type=submit], button:not([type])"));
    buttons.forEach((b) => (b.disabled = true));
    try {
      await action(new FormData(form), form);
    } catch (err) {
      showError(err, error);
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  });
}

export function copyButton(text, label = "Copy") {
  const button = h("button", { type: "button", class: "secondary", dataset: { testid: "copy" } }, label);
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select and copy it";
    }
    setTimeout(() => (button.textContent = label), 2000);
  });
  return button;
}

// The options of a <select>: items [{value, label}], keeping the current choice when it remains.
export function setOptions(select, items, { placeholder = null } = {}) {
  const keep = select.value;
  replace(select,
    placeholder === null ? null : h("option", { value: "" }, placeholder),
    items.map((it) => h("option", { value: it.value }, it.label)));
  if (items.some((it) => String(it.value) === keep)) select.value = keep;
}
