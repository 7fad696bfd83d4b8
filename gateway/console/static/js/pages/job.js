// One fine-tuning job: its facts, a live log and live charts (history from /events, then the
// /events/stream from the last event seen), cancel while it is queued or running, and the model
// it produced.
import { api, openEvents } from "../api.js";
import { lineChart } from "../chart.js";
import { $, fmtDuration, fmtNumber, fmtTime, h, notify, replace, showError } from "../dom.js";
import { canWrite, modelHref, TERMINAL } from "./training-common.js";

const EVENT_PREFIX = "ftevent-";
const HISTORY_PAGE = 1000; // events per /events page
const HISTORY_MAX = 20000; // the newest events loaded when the page opens
const LOG_LINES = 1000; // lines kept in the log view (the oldest drop off)
const REFRESH_MS = 400; // a log line that is not a metric point may mean a new status

const jobId = $("#job").dataset.jobId;
const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
const log = $("#job-log");
const clock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

let job = null;
let writable = false;
let lastSeq = -1; // the newest event shown: the stream resumes after it
let source = null;

// ── charts: x is the step ──

const points = { train: [], valid: [], lr: [], tps: [] };
const charts = {
  loss: lineChart($("#loss-chart"), { title: "Loss", xLabel: "step", yLabel: "loss", series: lossSeries() }),
  lr: lineChart($("#lr-chart"), { title: "Learning rate", xLabel: "step", yLabel: "learning rate", series: [{ name: "learning rate", points: [] }] }),
  tps: lineChart($("#tps-chart"), { title: "Throughput", xLabel: "step", yLabel: "tokens/s", zero: true, series: [{ name: "tokens/s", points: [] }] }),
};
let drawPending = false;

function lossSeries() {
  return [{ name: "training loss", points: points.train }, { name: "validation loss", points: points.valid }];
}

function draw() {
  drawPending = false;
  charts.loss.update(lossSeries());
  charts.lr.update([{ name: "learning rate", points: points.lr }]);
  charts.tps.update([{ name: "tokens/s", points: points.tps }]);
}

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(draw); // a burst of points is drawn once
}

let lastPoint = null;

function addPoint(d) {
  points.train.push([d.step, d.train_loss]);
  if (d.valid_loss !== undefined && d.valid_loss !== null) points.valid.push([d.step, d.valid_loss]);
  points.lr.push([d.step, d.lr]);
  points.tps.push([d.step, d.tokens_per_s]);
  lastPoint = d;
}

function showSteps() {
  if (!lastPoint) return;
  const bar = $("#job-steps");
  bar.max = lastPoint.total_steps;
  bar.value = lastPoint.step;
  const valid = lastPoint.valid_loss !== undefined && lastPoint.valid_loss !== null ? `, validation loss ${fmtNumber(lastPoint.valid_loss, 4)}` : "";
  $("#job-steps-text").textContent = `Step ${fmtNumber(lastPoint.step)} of ${fmtNumber(lastPoint.total_steps)}: training loss ${fmtNumber(lastPoint.train_loss, 4)}${valid}, ${fmtNumber(lastPoint.tokens_per_s)} tokens/s.`;
}

// ── the log ──

function logLine(e) {
  const at = new Date(e.created_at * 1000);
  return h("li", { class: `log-${e.level}`, dataset: { type: e.type, id: e.id } },
    h("time", { datetime: at.toISOString(), title: fmtTime(e.created_at) }, clock.format(at)),
    h("span", { class: "log-level" }, e.level),
    h("span", { class: "log-message" }, e.message));
}

function appendLog(lines) {
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 32;
  log.append(...lines);
  while (log.childElementCount > LOG_LINES) log.firstElementChild.remove();
  if (atEnd) log.scrollTop = log.scrollHeight; // follow the tail unless the reader scrolled up
}

function take(events) {
  const fresh = events.filter((e) => Number(e.id.slice(EVENT_PREFIX.length)) > lastSeq);
  if (!fresh.length) return [];
  lastSeq = Number(fresh[fresh.length - 1].id.slice(EVENT_PREFIX.length));
  for (const e of fresh) if (e.type === "metrics" && e.data) addPoint(e.data);
  appendLog(fresh.slice(-LOG_LINES).map(logLine));
  showSteps();
  scheduleDraw();
  return fresh;
}

const ENDED = { succeeded: "The job succeeded.", failed: "The job failed.", cancelled: "The job was cancelled." };

function setLogState(text) {
  $("#log-state").textContent = text;
}

// ── the job ──

function fact(label, value) {
  return [h("dt", {}, label), h("dd", {}, value === null || value === undefined || value === "" ? "—" : value)];
}

function renderJob(j) {
  job = j;
  const status = $("#job-status");
  status.textContent = j.status;
  status.className = `status status-${j.status}`;
  $("#cancel-job").hidden = !(writable && !TERMINAL.includes(j.status));
  const result = $("#job-result");
  if (j.status === "succeeded" && j.fine_tuned_model) {
    replace(result, "Produced ", h("a", { href: modelHref(j.fine_tuned_model), "data-testid": "job-result-link" }, j.fine_tuned_model), " (open it in the Model Library).");
  }
  result.hidden = !(j.status === "succeeded" && j.fine_tuned_model);
  const error = $("#job-error");
  if (j.error) replace(error, h("strong", {}, "Error: "), j.error.message, j.error.code ? ` (${j.error.code})` : "");
  error.hidden = !j.error;
  const ran = j.started_at && (j.finished_at || Date.now() / 1000) - j.started_at;
  replace($("#job-facts"),
    fact("Model", j.model),
    fact("Training file", h("code", {}, j.training_file)),
    fact("Validation file", j.validation_file ? h("code", {}, j.validation_file) : null),
    fact("Suffix", j.suffix),
    fact("Seed", String(j.seed)),
    fact("Created", fmtTime(j.created_at)),
    fact("Started", j.started_at ? fmtTime(j.started_at) : null),
    fact("Finished", j.finished_at ? fmtTime(j.finished_at) : null),
    fact(j.finished_at ? "Ran for" : "Running for", ran ? fmtDuration(ran) : null),
    fact("Attempts", String(j.attempts)),
    fact("Trained tokens", j.trained_tokens === null ? null : fmtNumber(j.trained_tokens)),
    fact("Fine-tuned model", j.fine_tuned_model));
  replace($("#job-hyperparameters"),
    Object.entries(j.hyperparameters).map(([name, value]) => fact(name, String(value))));
  $("#job-result-details").hidden = !j.result;
  $("#job-result-json").textContent = j.result ? JSON.stringify(j.result, null, 2) : "";
}

let refreshTimer = null;

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

async function refresh() {
  try {
    renderJob(await api("GET", base, { project: false }));
  } catch (err) {
    showError(err);
  }
}

// ── history, then live ──

async function loadHistory() {
  const pages = [];
  let after = null;
  let total = 0;
  for (;;) {
    const page = await api("GET", `${base}/events`, { query: { limit: HISTORY_PAGE, after }, project: false });
    pages.push(page.data);
    total += page.data.length;
    if (!page.has_more || !page.data.length) break;
    if (total >= HISTORY_MAX) {
      setLogState(`Showing the newest ${fmtNumber(total)} events.`);
      break;
    }
    after = page.data[page.data.length - 1].id;
  }
  take(pages.flat().reverse()); // pages come newest first
}

function follow() {
  if (TERMINAL.includes(job.status)) {
    setLogState(ENDED[job.status]);
    return;
  }
  const query = lastSeq >= 0 ? { after: `${EVENT_PREFIX}${lastSeq}` } : undefined;
  setLogState("Connecting…");
  source = openEvents(`${base}/events/stream`, (data) => {
    if (data === "[DONE]") {
      source.close();
      source = null;
      refresh().then(() => setLogState(ENDED[job.status]));
      return;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    const fresh = take([event]);
    if (fresh.length && event.type !== "metrics") scheduleRefresh();
  }, { query });
  source.onopen = () => setLogState("Live");
  // EventSource reconnects by itself (sending the last event id); CLOSED means it gave up
  source.onerror = () => setLogState(source && source.readyState === EventSource.CLOSED
    ? "The live stream stopped: reload the page to follow the job." : "Reconnecting…");
}

$("#cancel-job").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  button.disabled = true;
  try {
    renderJob(await api("POST", `${base}/cancel`, { project: false }));
    notify(job.status === "cancelled" ? `Job ${jobId} cancelled.` : `Job ${jobId}: cancel requested; it stops after the current step.`, "ok");
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
});

window.addEventListener("pagehide", () => source && source.close());

async function start() {
  try {
    const j = await api("GET", base, { project: false });
    writable = await canWrite(j.project_id);
    renderJob(j);
  } catch (err) {
    $("#job-status").textContent = err.status === 404 ? "not found" : "unavailable";
    showError(err, $("#job-load-error"));
    return;
  }
  try {
    await loadHistory();
  } catch (err) {
    showError(err);
  }
  follow();
}


start();
