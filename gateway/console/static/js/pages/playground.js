// The playground: a chat with any model the caller may use, streamed from POST
// /v1/chat/completions exactly as a script would call it, with the same request shown as curl
// and as openai-python. The conversation lives in this page only (history is resent each turn,
// as the API is stateless).
import { api, ApiError, currentProject, me, onProjectChange, streamSSE } from "../api.js";
import { $, clear, copyButton, fmtNumber, h, replace, showError } from "../dom.js";

const el = {
  settings: $("#pg-settings"),
  model: $("#pg-model"),
  system: $("#pg-system"),
  temperature: $("#pg-temperature"),
  topP: $("#pg-top-p"),
  maxTokens: $("#pg-max-tokens"),
  maxTokensHint: $("#pg-max-tokens-hint"),
  form: $("#pg-form"),
  input: $("#pg-input"),
  send: $("#pg-send"),
  stop: $("#pg-stop"),
  error: $("#pg-error"),
  transcript: $("#pg-transcript"),
  ttft: $("#pg-ttft"),
  tps: $("#pg-tps"),
  tokens: $("#pg-tokens"),
  clearChat: $("#pg-clear"),
  viewCode: $("#pg-view-code"),
  code: $("#pg-code"),
  curl: $("#pg-code-curl"),
  python: $("#pg-code-python"),
  projectNote: $("#pg-project-note"),
};

const history = []; // the turns so far: [{role: "user" | "assistant", content}]
let models = []; // GET /v1/models' data
let running = null; // the AbortController of the answer streaming now

// ── the request the form describes ──

// Each sampling field: its request name, input, and bounds as the API states them
// (gateway/openai/schemas.py); an empty field is left out (the model's default).
const NUMBERS = [
  { name: "temperature", label: "Temperature", input: el.temperature, min: 0, max: 2, integer: false },
  { name: "top_p", label: "Top-p", input: el.topP, min: 0, minExclusive: true, max: 1, integer: false },
  { name: "max_tokens", label: "Max tokens", input: el.maxTokens, min: 1, integer: true },
];

function sampling() {
  const out = {};
  for (const f of NUMBERS) {
    const raw = f.input.value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    const max = f.name === "max_tokens" ? maxLen() : f.max;
    const low = f.minExclusive ? value <= f.min : value < f.min;
    if (!Number.isFinite(value) || (f.integer && !Number.isInteger(value)) || low || (max && value > max)) {
      const range = `${f.minExclusive ? `above ${f.min}` : `at least ${f.min}`}${max ? `, at most ${max}` : ""}`;
      throw new Error(`${f.label} ${raw} is out of bounds: ${f.integer ? "a whole number " : ""}${range}`);
    }
    out[f.name] = value;
  }
  return out;
}

function maxLen() {
  const m = models.find((x) => x.id === el.model.value);
  return m && m.max_model_len ? m.max_model_len : null;
}

function messages(next) {
  const system = el.system.value.trim();
  return [
    ...(system ? [{ role: "system", content: system }] : []),
    ...history,
    ...(next ? [{ role: "user", content: next }] : []),
  ];
}

function requestBody(next) {
  return {
    model: el.model.value,
    messages: messages(next),
    ...sampling(),
    stream: true,
    stream_options: { include_usage: true },
  };
}

// ── the same request as code ──

const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;
const pyString = (s) => JSON.stringify(s); // a JSON string is a valid Python string literal

function curlCode(body, origin) {
  return [
    `curl -N ${shellQuote(`${origin}/v1/chat/completions`)} \\`,
    '  -H "Authorization: Bearer $AIMASS_API_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

function pythonCode(body, origin) {
  const lines = [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${pyString(`${origin}/v1`)}, api_key=os.environ["AIMASS_API_KEY"])`,
    "stream = client.chat.completions.create(",
    `    model=${pyString(body.model)},`,
    "    messages=[",
    ...body.messages.map((m) => `        {"role": ${pyString(m.role)}, "content": ${pyString(m.content)}},`),
    "    ],",
  ];
  for (const f of NUMBERS) if (f.name in body) lines.push(`    ${f.name}=${body[f.name]},`);
  lines.push(
    "    stream=True,",
    '    stream_options={"include_usage": True},',
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "    if chunk.usage:",
    '        print(f"\\n{chunk.usage.completion_tokens} completion tokens")',
  );
  return lines.join("\n");
}

function renderCode() {
  if (el.code.hidden) return;
  let body;
  try {
    body = requestBody(el.input.value.trim() || (history.length ? "" : "Hello!"));
  } catch (err) {
    replace(el.curl, err.message);
    replace(el.python, err.message);
    return;
  }
  const curl = curlCode(body, location.origin);
  const python = pythonCode(body, location.origin);
  replace(el.curl, curl);
  replace(el.python, python);
  replace($("#pg-copy-curl"), copyButton(curl, "Copy curl"));
  replace($("#pg-copy-python"), copyButton(python, "Copy Python"));
}

// ── the conversation ──

function bubble(role, text = "") {
  const body = h("div", { class: "pg-text" }, text);
  const node = h("div", { class: `pg-msg pg-msg-${role}` },
    h("div", { class: "pg-role" }, role === "user" ? "You" : "Assistant"), body);
  $("#pg-empty")?.remove();
  el.transcript.append(node);
  el.transcript.scrollTop = el.transcript.scrollHeight;
  return { node, body };
}

function setRunning(on) {
  el.send.disabled = on || needsProject();
  el.stop.disabled = !on;
  el.clearChat.disabled = on;
}

function showStats({ ttftMs, tokens, decodeS, partial }) {
  el.ttft.textContent = ttftMs === null ? "—" : `${fmtNumber(ttftMs)} ms`;
  el.tps.textContent = tokens > 1 && decodeS > 0 ? `${fmtNumber((tokens - 1) / decodeS, 1)} tokens/s` : "—";
  el.tokens.textContent = tokens ? `${fmtNumber(tokens)} output tokens${partial ? " (stopped; counted from the stream)" : ""}` : "";
}

async function send(text) {
  const body = requestBody(text); // throws a message naming a field out of bounds
  if (!body.model) throw new Error("Choose a model first.");
  clear(el.error);
  history.push({ role: "user", content: text });
  const asked = bubble("user", text);
  const answer = bubble("assistant");
  for (const old of el.transcript.querySelectorAll("[data-testid=pg-output]")) delete old.dataset.testid;
  answer.body.dataset.testid = "pg-output";
  const out = document.createTextNode("");
  answer.body.append(out);
  el.input.value = "";
  renderCode();

  running = new AbortController();
  setRunning(true);
  const t0 = performance.now();
  let first = null;
  let chunks = 0; // content deltas: one per token while the engine streams
  let usage = null;
  let stopped = false;
  try {
    await streamSSE("POST", "/v1/chat/completions", {
      json: body,
      signal: running.signal,
      onEvent(data) {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code, chunk.error.param, chunk);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          chunks += 1;
          out.appendData(delta.content);
          el.transcript.scrollTop = el.transcript.scrollHeight;
        }
      },
    });
  } catch (err) {
    if (err && err.name === "AbortError") {
      stopped = true;
    } else {
      running.abort(); // an error event mid-stream: close the response too
      history.pop();
      asked.node.classList.add("pg-failed");
      answer.node.remove();
      el.input.value = text;
      showError(err, el.error);
      return;
    }
  } finally {
    running = null;
    setRunning(false);
  }
  const end = performance.now();
  if (stopped && !out.data) {
    history.pop(); // nothing came back: the question goes back to the box
    asked.node.remove();
    answer.node.remove();
    el.input.value = text;
  } else {
    history.push({ role: "assistant", content: out.data });
    if (stopped) answer.node.classList.add("pg-stopped");
  }
  const tokens = usage ? usage.completion_tokens : chunks;
  showStats({ ttftMs: first === null ? null : first - t0, tokens, decodeS: first === null ? 0 : (end - first) / 1000, partial: !usage });
  renderCode();
}

function clearConversation() {
  history.length = 0;
  replace(el.transcript, h("p", { class: "empty", id: "pg-empty" }, "Send a message to start."));
  clear(el.error);
  el.ttft.textContent = "—";
  el.tps.textContent = "—";
  el.tokens.textContent = "";
  renderCode();
}

// ── models and the project ──

// A person's requests are metered under a project: api.js names the current one in the
// OpenAI-Project header, so with none chosen the API would refuse (400).
function needsProject() {
  const who = me();
  return Boolean(who && who.kind === "user" && !currentProject());
}

function showProject() {
  const missing = needsProject();
  el.projectNote.hidden = !missing;
  el.projectNote.textContent = missing
    ? "Choose a project in the header: your requests are counted and quota-checked under it."
    : "";
  el.send.disabled = Boolean(running) || missing;
}

async function loadModels() {
  const wanted = new URLSearchParams(location.search).get("model");
  const keep = el.model.value;
  try {
    ({ data: models } = await api("GET", "/v1/models"));
  } catch (err) {
    replace(el.model, h("option", { value: "" }, "No models"));
    showError(err, el.error);
    return;
  }
  models.sort((a, b) => a.id.localeCompare(b.id));
  const ids = models.map((m) => m.id);
  // ?model= may name a version or an alias ("name:3", "name@staging") that /v1/models does not
  // list: it is offered as given, and the API says whether it serves it
  const extra = wanted && !ids.includes(wanted) ? [wanted] : [];
  replace(el.model,
    ids.length || extra.length ? null : h("option", { value: "" }, "No model is served to you"),
    [...extra, ...ids].map((id) => h("option", { value: id }, id)));
  if (keep && [...extra, ...ids].includes(keep)) el.model.value = keep;
  else if (wanted) el.model.value = wanted;
  modelChanged();
}

function modelChanged() {
  const max = maxLen();
  if (max) el.maxTokens.max = String(max);
  else el.maxTokens.removeAttribute("max");
  el.maxTokensHint.textContent = max
    ? `1 to ${fmtNumber(max)}: the model's context, prompt included`
    : "at least 1; the model's context bounds it";
  renderCode();
}

// ── wiring ──

el.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = el.input.value.trim();
  if (!text || running) return;
  if (needsProject()) {
    showProject();
    return;
  }
  try {
    await send(text);
  } catch (err) {
    showError(err, el.error);
  }
});
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.stop.addEventListener("click", () => running && running.abort());
el.clearChat.addEventListener("click", clearConversation);
el.model.addEventListener("change", modelChanged);
el.settings.addEventListener("input", renderCode);
el.settings.addEventListener("submit", (event) => event.preventDefault());
el.input.addEventListener("input", renderCode);
el.viewCode.addEventListener("click", () => {
  el.code.hidden = !el.code.hidden;
  el.viewCode.setAttribute("aria-expanded", String(!el.code.hidden));
  el.viewCode.textContent = el.code.hidden ? "View code" : "Hide code";
  renderCode();
  if (!el.code.hidden) el.code.scrollIntoView({ block: "nearest" });
});
onProjectChange(() => {
  showProject();
  loadModels();
});

showProject();
loadModels();
