// Datasets: upload a training file (with progress; the API validates every line before it
// stores anything), list the project's files, preview their first records, delete them.
import { api, apiText, onProjectChange, upload } from "../api.js";
import { $, fmtBytes, fmtTime, h, notify, onSubmit, pager, replace, showError, table } from "../dom.js";
import { canWrite, statusBadge, whenProject } from "./training-common.js";

const PAGE = 20; // files per page
const PREVIEW_BYTES = 64 * 1024; // a preview reads at most this much of a file (a Range request)
const PREVIEW_RECORDS = 20;
const PREVIEW_CHARS = 2000; // of one record: a long document is cut

const form = $("#upload-form");
const progressField = $("#upload-progress-field");
const progress = $("#upload-progress");
const progressText = $("#upload-progress-text");
const result = $("#upload-result");
const previewCard = $("#preview-card");
const previewBox = $("#preview");
let files = null;
let previewing = null; // the id of the file shown in the preview
let writable = true;

// ── upload ──

onSubmit(form, async (data) => {
  result.hidden = true;
  const file = data.get("file");
  if (!(file instanceof File) || !file.name) throw new Error("Choose a file to upload.");
  const body = new FormData();
  body.append("purpose", data.get("purpose"));
  body.append("file", file, file.name); // the browser streams it from disk as it sends
  progress.value = 0;
  progressField.hidden = false;
  progressText.textContent = `Sending ${file.name} (${fmtBytes(file.size)})…`;
  try {
    const stored = await upload("/v1/files", body, (fraction) => {
      progress.value = fraction;
      progressText.textContent = fraction < 1
        ? `${Math.round(fraction * 100)}% of ${fmtBytes(file.size)} sent`
        : "Sent. The server checked every line.";
    });
    showStored(stored);
    form.reset();
    files.reload();
  } catch (err) {
    progressText.textContent = err.status === 400 ? "Refused: the file was not stored." : "The upload failed.";
    throw err; // its message (the trainer's line-numbered one for a bad file) goes in the form's <pre>
  }
});

function fact(label, value) {
  return [h("dt", {}, label), h("dd", {}, value)];
}

function showStored(file) {
  replace(result,
    h("h3", {}, `Stored ${file.filename}`),
    h("dl", { class: "facts" },
      fact("Status", statusBadge(file.status, { "data-testid": "upload-status" })),
      fact("Details", file.status_details || "every line read; no problems found"),
      fact("File id", h("code", {}, file.id)),
      fact("Size", fmtBytes(file.bytes)),
      fact("sha256", h("code", { class: "wrap" }, file.sha256))),
    h("button", { type: "button", class: "secondary", on: { click: () => preview(file) } }, "Preview it"));
  result.hidden = false;
}

// ── the list ──

function columns() {
  return [
    { title: "File", cell: (f) => [h("div", {}, f.filename), h("code", { class: "hint" }, f.id)] },
    { title: "Size", class: "num", cell: (f) => fmtBytes(f.bytes) },
    { title: "Uploaded", cell: (f) => fmtTime(f.created_at) },
    { title: "Status", cell: (f) => [statusBadge(f.status), f.status_details ? h("div", { class: "hint" }, f.status_details) : null] },
    { title: "Actions", cell: actions },
  ];
}

function actions(f) {
  return h("div", { class: "actions" },
    h("button", { type: "button", class: "secondary", "data-testid": "preview-file", on: { click: () => preview(f) } }, "Preview"),
    h("a", { href: `/v1/files/${encodeURIComponent(f.id)}/content`, download: f.filename }, "Download"),
    writable ? h("button", { type: "button", class: "danger", "data-testid": "delete-file", on: { click: (e) => remove(f, e.currentTarget) } }, "Delete") : null);
}

function listFiles() {
  files = pager({
    into: $("#files"),
    load: async (after) => {
      const page = await api("GET", "/v1/files", { query: { limit: PAGE, after, order: "desc" } });
      return { data: page.data, has_more: page.has_more, last: page.last_id };
    },
    render: (rows, first) => (rows.length || first
      ? table(columns(), rows, { empty: "No files yet: upload one above.", rowAttrs: (f) => ({ dataset: { testid: "file-row", id: f.id } }) })
      : h("p", { class: "hint" }, "No more files.")),
  });
}

async function remove(f, button) {
  if (!window.confirm(`Delete ${f.filename} (${f.id})? Its bytes are deleted too.`)) return;
  button.disabled = true;
  try {
    await api("DELETE", `/v1/files/${encodeURIComponent(f.id)}`);
    notify(`Deleted ${f.filename}.`, "ok");
    if (previewing === f.id) closePreview();
    files.reload();
  } catch (err) {
    showError(err); // e.g. 409: a job that reads it has not finished
    button.disabled = false;
  }
}

// ── preview: the first records, from the first bytes only ──

function describe(line) {
  let record;
  try {
    record = JSON.parse(line);
  } catch {
    return { kind: "line", text: line };
  }
  if (record && typeof record.text === "string") return { kind: "text", text: record.text };
  if (record && Array.isArray(record.messages)) {
    const turns = record.messages.map((m) => `${m && m.role}: ${m && typeof m.content === "string" ? m.content : JSON.stringify(m && m.content)}`);
    return { kind: "chat", text: turns.join("\n") };
  }
  return { kind: "json", text: line };
}

function cut(text) {
  return text.length > PREVIEW_CHARS ? `${text.slice(0, PREVIEW_CHARS)}… (${text.length - PREVIEW_CHARS} more characters)` : text;
}

async function preview(f) {
  previewing = f.id;
  previewCard.hidden = false;
  $("#preview-heading").textContent = `Preview: ${f.filename}`;
  $("#preview-summary").textContent = "";
  replace(previewBox, h("p", { class: "hint" }, "Reading the first records…"));
  previewCard.scrollIntoView({ block: "nearest" });
  try {
    const read = Math.min(f.bytes, PREVIEW_BYTES);
    const text = read ? await apiText(`/v1/files/${encodeURIComponent(f.id)}/content`, { headers: { Range: `bytes=0-${read - 1}` } }) : "";
    if (previewing !== f.id) return; // another preview was asked for meanwhile
    const lines = text.split(/\r?\n/);
    const partial = f.bytes > read;
    if (partial) lines.pop(); // the read ended inside this line
    const jsonl = f.filename.toLowerCase().endsWith(".jsonl");
    const numbered = lines.map((line, i) => ({ n: i + 1, line }));
    const shown = (jsonl ? numbered.filter((r) => r.line.trim()) : numbered).slice(0, PREVIEW_RECORDS);
    $("#preview-summary").textContent = `The first ${shown.length} ${jsonl ? "records" : "lines"} of ${fmtBytes(f.bytes)}${partial ? ` (read from its first ${fmtBytes(read)})` : ""}.`;
    if (!shown.length) {
      replace(previewBox, h("p", { class: "empty" }, "Nothing to show in the file's first bytes."));
    } else if (jsonl) {
      replace(previewBox, h("ol", { class: "records" }, shown.map((r) => {
        const d = describe(r.line);
        return h("li", { "data-testid": "preview-record" },
          h("div", { class: "hint" }, `line ${r.n} · ${d.kind}`),
          h("pre", {}, cut(d.text)));
      })));
    } else {
      const width = String(shown[shown.length - 1].n).length;
      replace(previewBox, h("pre", { "data-testid": "preview-record" },
        shown.map((r) => `${String(r.n).padStart(width)}  ${cut(r.line)}`).join("\n")));
    }
  } catch (err) {
    showError(err, previewBox);
  }
}

function closePreview() {
  previewing = null;
  previewCard.hidden = true;
  replace(previewBox);
}

$("#preview-close").addEventListener("click", closePreview);
$("#files-refresh").addEventListener("click", () => files && files.reload());

// ── the project ──

async function load() {
  writable = await canWrite();
  form.hidden = !writable;
  let note = $("#upload-readonly");
  if (!writable && !note) {
    note = h("p", { id: "upload-readonly", class: "hint" }, "You are a viewer in this project: you can read its files, not upload or delete them.");
    form.after(note);
  }
  if (note) note.hidden = writable;
  result.hidden = true;
  closePreview();
  listFiles();
}

whenProject().then(() => {
  load();
  onProjectChange(load);
});
