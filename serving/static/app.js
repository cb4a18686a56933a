// The playground: pick a model, chat or complete with streaming answers, and watch a model wake from zero.
// Talks to the service's OpenAI routes with relative URLs, so it works under any route prefix.
import { SSEParser } from "./sse.js";

const PHASES = [
  ["process_start", "Process start"],
  ["imports", "Imports"],
  ["model_code", "Model code"],
  ["weights", "Weights"],
  ["warmup", "Warm-up"],
  ["first_generation", "First generation"],
];
const STATE_LABELS = {
  running: "running",
  starting: "starting",
  scaled_to_zero: "at zero",
  evicted: "evicted",
};
// Relative to the page, never to the host's root: the service may sit under a route prefix.
const ROUTES = {
  models: "v1/models",
  health: "healthz",
  chat: "v1/chat/completions",
  completions: "v1/completions",
};
const KEY_STORAGE = "playground.apiKey";
const MODEL_STORAGE = "playground.model";
const WAKE_POLL_MS = 500;
const IDLE_REFRESH_MS = 5000;

const $ = (id) => document.getElementById(id);
const url = (path) => new URL(path, document.baseURI).toString();

const ui = {
  serviceStatus: $("service-status"),
  keyPanel: $("key-panel"),
  keyMessage: $("key-message"),
  key: $("api-key"),
  keyForget: $("key-forget"),
  model: $("model"),
  modelState: $("model-state"),
  sampling: $("sampling"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  topP: $("top-p"),
  seed: $("seed"),
  stop: $("stop"),
  system: $("system"),
  zeroNotice: $("zero-notice"),
  transcripts: { chat: $("transcript-chat"), completion: $("transcript-completion") },
  prompt: $("prompt"),
  promptLabel: $("prompt-label"),
  send: $("send"),
  stopButton: $("stop-button"),
  clear: $("clear"),
  status: $("status"),
};

const state = {
  auth: "unknown", // "required" | "none" | "unknown", from /healthz
  keyRejected: false,
  models: [],
  mode: "chat",
  history: [], // chat messages sent and answered, in order
  active: null, // the request in flight: {controller, stopped}
};

// ---------------------------------------------------------------- API key

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const h = { "Content-Type": "application/json", Accept: "application/json, text/event-stream" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function renderKeyPanel() {
  const needed = state.auth === "required" || state.keyRejected;
  ui.keyPanel.hidden = !needed && !apiKey();
  const missing = needed && !apiKey();
  ui.keyPanel.classList.toggle("alert", missing || state.keyRejected);
  ui.keyPanel.classList.toggle("compact", !missing && !state.keyRejected);
  if (state.keyRejected) {
    ui.keyMessage.textContent = apiKey()
      ? "The service did not accept this API key. Check it and paste it again."
      : "The service needs an API key. Paste it here, then send again.";
  } else if (missing) {
    ui.keyMessage.textContent = "This service needs an API key. Paste it here to use the models.";
  } else {
    ui.keyMessage.textContent = state.auth === "required" ? "This service needs an API key." : "API key";
  }
}

// ---------------------------------------------------------------- models

async function fetchModels() {
  // /v1/models and /healthz never wake a model. /v1/models needs the key; /healthz is open and lists the
  // same entries, so the picker still fills before a key is given.
  try {
    const response = await fetch(url(ROUTES.models), { headers: headers(), cache: "no-store" });
    if (response.ok) {
      state.keyRejected = false;
      return (await response.json()).data;
    }
    if (response.status === 401) {
      // With a key, the key is wrong; without one, the service evidently wants one.
      state.keyRejected = Boolean(apiKey());
      if (!apiKey()) state.auth = "required";
    }
  } catch {
    // Unreachable: /healthz below says so.
  }
  const health = await fetchHealth();
  return health ? health.models || [] : null;
}

async function fetchHealth() {
  try {
    const response = await fetch(url(ROUTES.health), { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    state.auth = body.auth || "unknown";
    ui.serviceStatus.textContent = state.auth === "required" ? "Service up · API key required" : "Service up";
    ui.serviceStatus.classList.remove("down");
    return body;
  } catch {
    ui.serviceStatus.textContent = "Cannot reach the service: is it running? Retrying every few seconds.";
    ui.serviceStatus.classList.add("down");
    return null;
  }
}

async function refreshModels() {
  const models = await fetchModels();
  if (models) setModels(models);
  renderKeyPanel();
}

function setModels(models) {
  state.models = models;
  const current = ui.model.value || sessionStorage.getItem(MODEL_STORAGE);
  const options = models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${STATE_LABELS[m.state] || m.state})`;
    return option;
  });
  if (options.length === 0) {
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "No model served";
    options.push(none);
  }
  ui.model.replaceChildren(...options);
  if (models.some((m) => m.id === current)) ui.model.value = current;
  renderModelState();
}

function selectedModel() {
  return state.models.find((m) => m.id === ui.model.value) || null;
}

function updateModel(entry) {
  const index = state.models.findIndex((m) => m.id === entry.id);
  if (index === -1) return;
  state.models[index] = entry;
  const option = [...ui.model.options].find((o) => o.value === entry.id);
  if (option) option.textContent = `${entry.id} (${STATE_LABELS[entry.state] || entry.state})`;
  if (entry.id === ui.model.value) renderModelState();
}

function renderModelState() {
  const model = selectedModel();
  ui.modelState.replaceChildren();
  ui.zeroNotice.hidden = true;
  if (!model) return;
  const badge = document.createElement("span");
  badge.className = `badge state-${model.state}`;
  badge.textContent = STATE_LABELS[model.state] || model.state;
  ui.modelState.append(badge);
  const r = model.replicas;
  if (r) ui.modelState.append(` ${r.running} running, ${r.starting} starting (min ${r.min}, max ${r.max})`);
  const last = model.last_cold_start;
  const lastS = last && (typeof last.total_s === "number" ? last.total_s : sumPhases(reportPhases(last)));
  if (last) ui.modelState.append(document.createElement("br"), `Last wake-up: ${seconds(lastS)}`);

  // While a request is in flight its answer shows the wake-up itself.
  if (state.active) return;
  const wait = last ? ` Its last wake-up took ${seconds(lastS)}.` : "";
  if (model.state === "scaled_to_zero") {
    showNotice(`${model.id} is at zero: no replica is running. Your next message wakes it, so the first answer waits
      for the model to load.${wait}`);
  } else if (model.state === "evicted") {
    showNotice(`${model.id} was evicted to make room for another model. Your next message starts it again and waits
      for it to load.${wait}`);
  } else if (model.state === "starting") {
    showNotice(`${model.id} is starting. A message sent now waits until it is ready.`);
  }
}

function showNotice(text) {
  ui.zeroNotice.textContent = text.replace(/\s+/g, " ");
  ui.zeroNotice.hidden = false;
}

// ---------------------------------------------------------------- transcript

function transcript() {
  return ui.transcripts[state.mode];
}

function scrollToEnd(force = false) {
  const box = transcript();
  const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  if (force || nearEnd) box.scrollTop = box.scrollHeight;
  // On a phone the page itself scrolls: bring the transcript's end and the box below it into view.
  if (force) document.querySelector(".composer").scrollIntoView({ block: "nearest" });
}

function addBubble(role, text) {
  const bubble = document.createElement("article");
  bubble.className = `bubble ${role}`;
  const who = document.createElement("h3");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  bubble.append(who, body);
  transcript().append(bubble);
  scrollToEnd(true);
  return bubble;
}

/** The view of one answer: its growing text, its wake-up panel, its stats line. */
class AnswerView {
  constructor(model, promptText) {
    this.root = document.createElement("article");
    this.root.className = "bubble assistant pending";
    this.root.dataset.model = model;
    const who = document.createElement("h3");
    who.className = "who";
    who.textContent = model;
    this.wake = document.createElement("section");
    this.wake.className = "wake";
    this.wake.hidden = true;
    // Not a live region: it redraws ten times a second. Completed phases are announced in the status line.
    this.wake.setAttribute("aria-label", "Wake-up of the model");
    this.body = document.createElement("div");
    this.body.className = "text answer";
    this.body.setAttribute("aria-live", "polite");
    this.body.setAttribute("aria-busy", "true");
    if (promptText !== undefined) {
      const echo = document.createElement("span");
      echo.className = "echo";
      echo.textContent = promptText;
      this.body.append(echo);
    }
    this.textNode = document.createTextNode("");
    this.body.append(this.textNode);
    this.stats = document.createElement("p");
    this.stats.className = "stats";
    this.stats.textContent = "Waiting for the first token…";
    this.root.append(who, this.wake, this.body, this.stats);
    transcript().append(this.root);
    scrollToEnd(true);
  }

  get text() {
    return this.textNode.data;
  }

  append(text) {
    this.root.classList.add("started");
    this.textNode.appendData(text);
    scrollToEnd();
  }

  finish(kind) {
    this.root.classList.remove("pending");
    this.root.classList.add(kind);
    this.body.setAttribute("aria-busy", "false");
  }

  showWaking(model, elapsedS, phases, current, comment) {
    this.wake.hidden = false;
    this.root.classList.add("has-wake");
    const title = document.createElement("h4");
    title.textContent = `Waking ${model}: ${seconds(elapsedS)} so far`;
    const list = phaseList(phases, current, true);
    const parts = [title, list];
    if (comment) {
      const line = document.createElement("p");
      line.className = "comment";
      line.textContent = comment;
      parts.push(line);
    }
    this.wake.replaceChildren(...parts);
  }

  showWakeAbandoned(model, phases, waitedS) {
    this.wake.classList.add("done");
    const title = document.createElement("h4");
    title.textContent = `Stopped waiting for ${model} after ${seconds(waitedS)}; it may still be waking`;
    this.wake.replaceChildren(title, phaseList(phases, null, false));
  }

  hideWake() {
    this.wake.hidden = true;
    this.root.classList.remove("has-wake");
  }

  showWakeSummary(model, report, waitedS) {
    this.wake.hidden = false;
    this.root.classList.add("has-wake");
    this.wake.classList.add("done");
    const phases = reportPhases(report);
    const total = typeof report.total_s === "number" ? report.total_s : sumPhases(phases);
    const title = document.createElement("h4");
    title.textContent = total
      ? `${model} woke up in ${seconds(total)} (you waited ${seconds(waitedS)} for the first token)`
      : `${model} woke up: you waited ${seconds(waitedS)} for the first token`;
    this.wake.replaceChildren(title, phaseList(phases, null, false));
  }
}

/** A cold-start report's phases: `phases` as the API documents it, or `<phase>_s` keys at its top level. */
function reportPhases(report) {
  if (report.phases) return report.phases;
  const phases = {};
  for (const [name] of PHASES) {
    if (typeof report[`${name}_s`] === "number") phases[`${name}_s`] = report[`${name}_s`];
  }
  return phases;
}

function sumPhases(phases) {
  return Object.values(phases).reduce((sum, value) => sum + value, 0);
}

function phaseList(phases, current, live) {
  const list = document.createElement("ol");
  list.className = "phases";
  const values = PHASES.map(([name]) => phases[`${name}_s`]).filter((v) => typeof v === "number");
  const longest = Math.max(0.001, ...values);
  for (const [name, label] of PHASES) {
    const value = phases[`${name}_s`];
    const done = typeof value === "number";
    const isCurrent = !done && name === current;
    if (!done && !live) continue;
    const item = document.createElement("li");
    item.className = done ? "done" : isCurrent ? "current" : "pending";
    item.dataset.phase = name;
    const labelEl = document.createElement("span");
    labelEl.className = "phase-name";
    labelEl.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = done ? `${Math.max(2, (100 * value) / longest)}%` : "0";
    bar.append(fill);
    const time = document.createElement("span");
    time.className = "phase-time";
    time.textContent = done ? seconds(value) : isCurrent ? "in progress…" : "";
    item.append(labelEl, bar, time);
    list.append(item);
  }
  return list;
}

function seconds(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "?";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

// ---------------------------------------------------------------- wake-up watcher

/**
 * While a request waits for its first token, poll /v1/models for the model's `waking` progress and show it.
 * After the first token, read the finished cold-start report and leave its phase breakdown on the answer.
 */
class WakeWatcher {
  constructor(model, view, startedAt) {
    this.model = model;
    this.view = view;
    this.startedAt = startedAt;
    const entry = state.models.find((m) => m.id === model);
    this.expectCold = Boolean(entry && entry.state !== "running");
    this.previousReport = JSON.stringify(entry ? entry.last_cold_start : null);
    this.waking = null;
    this.comment = null;
    this.seen = false;
    this.stopped = false;
    this.announced = new Set();
    this.poll();
    this.timer = setInterval(() => this.poll(), WAKE_POLL_MS);
    this.clock = setInterval(() => this.render(), 100);
  }

  async poll() {
    const models = await fetchModels();
    if (this.stopped || !models) return;
    const entry = models.find((m) => m.id === this.model);
    if (!entry) return;
    updateModel(entry);
    if (entry.waking) {
      this.waking = entry.waking;
      this.seen = true;
      this.announce(entry.waking.phases || {});
    }
    this.render();
  }

  announce(phases) {
    for (const [name, label] of PHASES) {
      const value = phases[`${name}_s`];
      if (typeof value !== "number" || this.announced.has(name)) continue;
      this.announced.add(name);
      setStatus(`Waking ${this.model}: ${label.toLowerCase()} done in ${seconds(value)}.`);
    }
  }

  onComment(text) {
    if (!text.startsWith("waking")) return;
    this.comment = text;
    this.seen = true;
    this.render();
  }

  render() {
    if (this.stopped || !(this.seen || this.expectCold)) return;
    const elapsed = (performance.now() - this.startedAt) / 1000;
    const waking = this.waking || { phases: {}, current: null };
    this.view.showWaking(this.model, elapsed, waking.phases || {}, waking.current, this.comment);
  }

  halt() {
    this.stopped = true;
    clearInterval(this.timer);
    clearInterval(this.clock);
  }

  /** The request ended before any token: say how far the wake-up got, or drop a panel that showed nothing. */
  abandon(waitedS) {
    this.halt();
    if (this.seen || this.expectCold) {
      this.view.showWakeAbandoned(this.model, (this.waking && this.waking.phases) || {}, waitedS);
    }
    else this.view.hideWake();
  }

  /** The first token came: stop watching and, if this request woke the model, show how the wake-up went. */
  async firstToken(waitedS) {
    this.halt();
    if (!(this.seen || this.expectCold)) return;
    const deadline = performance.now() + 10000;
    let report = null;
    while (performance.now() < deadline) {
      const models = await fetchModels();
      const entry = models && models.find((m) => m.id === this.model);
      if (entry) updateModel(entry);
      const last = entry && entry.last_cold_start;
      if (last && JSON.stringify(last) !== this.previousReport) {
        report = last;
        break;
      }
      await new Promise((resolve) => setTimeout(resolve, WAKE_POLL_MS));
    }
    // Without a fresh report, keep what was seen while waiting: the phases that had completed.
    this.view.showWakeSummary(this.model, report || { phases: (this.waking && this.waking.phases) || {} }, waitedS);
  }
}

// ---------------------------------------------------------------- sampling

function readParams() {
  const params = {};
  const maxTokens = Number(ui.maxTokens.value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return invalid(ui.maxTokens, "Max tokens must be a whole number, 1 or more.");
  params.max_tokens = maxTokens;
  const temperature = Number(ui.temperature.value);
  if (ui.temperature.value === "" || !(temperature >= 0 && temperature <= 2)) return invalid(ui.temperature, "Temperature must be between 0 and 2.");
  params.temperature = temperature;
  const topP = Number(ui.topP.value);
  if (ui.topP.value === "" || !(topP > 0 && topP <= 1)) return invalid(ui.topP, "Top-p must be above 0 and at most 1.");
  params.top_p = topP;
  if (ui.seed.value.trim() !== "") {
    const seed = Number(ui.seed.value);
    if (!Number.isInteger(seed)) return invalid(ui.seed, "Seed must be a whole number, or empty for a random one.");
    params.seed = seed;
  }
  const stops = ui.stop.value
    .split("\n")
    .filter((s) => s !== "")
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
  if (stops.length > 4) return invalid(ui.stop, "At most 4 stop sequences, one per line.");
  if (stops.length) params.stop = stops;
  return { params };
}

function invalid(field, message) {
  ui.sampling.open = true;
  field.setAttribute("aria-invalid", "true");
  field.focus();
  return { error: message };
}

// ---------------------------------------------------------------- errors

async function readError(response) {
  let message = "";
  let param = null;
  try {
    const body = await response.json();
    const error = body.error || body;
    message = typeof error === "string" ? error : error.message || body.detail || "";
    param = error.param || null;
  } catch {
    message = "";
  }
  return {
    status: response.status,
    message,
    param,
    retryAfter: response.headers.get("Retry-After"),
    requestId: response.headers.get("x-request-id"),
  };
}

function sentence(text) {
  const t = (text || "").trim();
  return t === "" ? "" : /[.!?]$/.test(t) ? `${t} ` : `${t}. `;
}

/** What went wrong, in words that say what to do next. */
function explain(error) {
  const said = sentence(error.message);
  const ref = error.requestId ? ` (request id ${error.requestId})` : "";
  switch (error.status) {
    case 401:
      return apiKey()
        ? "The service did not accept your API key. Check the key in the API key field at the top and send again."
        : "This service needs an API key. Paste it in the API key field at the top and send again.";
    case 404:
      return `The service does not serve this model. ${said}Pick a model from the list (it has just been refreshed).`;
    case 413:
      return `Too large for this service. ${said}Shorten the message, clear the conversation, or ask for fewer tokens.`;
    case 400:
    case 422:
      return `The service refused the request. ${said}${error.param ? `Check “${error.param}”, ` : "Change the setting it names, "}then send again.`;
    case 429:
    case 503: {
      const wait = Number(error.retryAfter);
      const when = Number.isFinite(wait) && wait > 0 ? `Try again in ${wait} s` : "Try again in a moment";
      return `The service is at capacity. ${said}${when} (the service asked for that wait).`;
    }
    case 504:
      return `No answer within the service's time limit. ${said}A model waking from zero may be ready now: send again, or ask for fewer tokens.`;
    default:
      if (error.status >= 500) return `The service failed (HTTP ${error.status}). ${said}Send again; if it keeps failing, its log has the details${ref}.`;
      return `The request failed (HTTP ${error.status}). ${said}`;
  }
}

function showError(view, text, retryAfter) {
  const box = document.createElement("p");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.textContent = text;
  view.root.append(box);
  const wait = Number(retryAfter);
  if (Number.isFinite(wait) && wait > 0) {
    // Count down so the person knows when sending again makes sense.
    const countdown = document.createElement("p");
    countdown.className = "countdown";
    box.after(countdown);
    const until = performance.now() + wait * 1000;
    const tick = () => {
      const left = Math.ceil((until - performance.now()) / 1000);
      countdown.textContent = left > 0 ? `You can send again in ${left} s.` : "You can send again now.";
      if (left > 0) setTimeout(tick, 250);
    };
    tick();
  }
  setStatus(text);
  scrollToEnd(true);
}

// ---------------------------------------------------------------- sending

function setStatus(text) {
  ui.status.textContent = text;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stopButton.disabled = !busy;
  ui.model.disabled = busy;
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.disabled = busy;
  renderModelState();
}

async function send() {
  if (state.active) return;
  const text = ui.prompt.value;
  if (text.trim() === "") {
    setStatus(state.mode === "chat" ? "Type a message first." : "Type a prompt first.");
    ui.prompt.focus();
    return;
  }
  const model = ui.model.value;
  if (!model) {
    setStatus("No model to send to: the service lists none.");
    return;
  }
  for (const field of document.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
  const { params, error } = readParams();
  if (error) {
    setStatus(error);
    return;
  }

  const chat = state.mode === "chat";
  const body = { model, stream: true, stream_options: { include_usage: true }, ...params };
  let userMessage = null;
  let userBubble = null;
  if (chat) {
    userMessage = { role: "user", content: text };
    const system = ui.system.value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, userMessage];
    userBubble = addBubble("user", text);
  } else {
    body.prompt = text;
  }
  ui.prompt.value = "";
  const view = new AnswerView(model, chat ? undefined : text);
  const controller = new AbortController();
  const active = { controller, stopped: false };
  state.active = active;
  setBusy(true);
  setStatus(`Sent to ${model}. Waiting for the first token…`);

  const started = performance.now();
  const watcher = new WakeWatcher(model, view, started);
  let firstAt = null;
  let chunks = 0;
  let usage = null;
  let finishReason = null;
  let streamError = null;
  let done = false;
  let outcome = "done";

  const parser = new SSEParser({
    onComment: (comment) => watcher.onComment(comment),
    onData: (data) => {
      if (data === "[DONE]") {
        done = true;
        return;
      }
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        return; // not JSON: nothing a person can use
      }
      if (chunk.error) {
        streamError = chunk.error;
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = chat ? choice.delta && choice.delta.content : choice.text;
        if (piece) {
          if (firstAt === null) {
            firstAt = performance.now();
            watcher.firstToken((firstAt - started) / 1000);
            setStatus(`${model} is answering…`);
          }
          chunks += 1;
          view.append(piece);
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    },
  });

  try {
    const response = await fetch(url(chat ? ROUTES.chat : ROUTES.completions), {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const failure = await readError(response);
      if (failure.status === 401) {
        state.keyRejected = true;
        renderKeyPanel();
        ui.key.focus();
      }
      if (failure.status === 404) refreshModels();
      throw Object.assign(new Error(failure.message), { failure });
    }
    const reader = response.body.getReader();
    while (true) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      parser.push(value);
    }
    parser.end();
    if (streamError) outcome = "error";
    else if (!done) outcome = "cut";
  } catch (err) {
    if (active.stopped || err.name === "AbortError") outcome = "stopped";
    else if (err.failure) {
      outcome = "refused";
      showError(view, explain(err.failure), err.failure.retryAfter);
    } else {
      outcome = "network";
      showError(view, "Could not reach the service (network error). Check that it is running and that this page's address is right, then send again.");
    }
  } finally {
    if (firstAt === null) watcher.abandon((performance.now() - started) / 1000);
    else watcher.halt();
    state.active = null;
    setBusy(false);
  }

  const ended = performance.now();
  view.finish(outcome);
  view.stats.textContent = statsLine({ started, firstAt, ended, chunks, usage, finishReason, outcome });
  if (outcome === "error") showError(view, `The answer broke off: ${sentence(streamError.message)}Send again to retry.`);
  if (outcome === "cut") showError(view, "The connection closed before the answer was complete. Send again to retry.");
  if (outcome === "done" || outcome === "stopped") setStatus(view.stats.textContent);

  if (firstAt === null && outcome !== "done") {
    // Nothing came back: give the text back so Enter sends it again, and leave the history as it was.
    if (!ui.prompt.value) ui.prompt.value = text;
    if (userBubble) userBubble.classList.add("unsent");
  } else if (chat) {
    state.history.push(userMessage, { role: "assistant", content: view.text });
  }
  ui.prompt.focus();
  document.querySelector(".composer").scrollIntoView({ block: "nearest" });
  // The answer may have changed the model's state (woken, or stopped while waking); the service caches
  // replica states for about a second, so look again once that has passed.
  refreshModels();
  setTimeout(() => state.active || refreshModels(), 1500);
}

function statsLine({ started, firstAt, ended, chunks, usage, finishReason, outcome }) {
  const parts = [];
  if (outcome === "stopped") parts.push("Stopped");
  if (firstAt !== null) {
    parts.push(`first token ${seconds((firstAt - started) / 1000)}`);
    const tokens = usage ? usage.completion_tokens : chunks;
    const decodeS = (ended - firstAt) / 1000;
    // A rate needs the answer to arrive in pieces; one piece says nothing about the model's speed.
    if (chunks > 1 && tokens > 1 && decodeS > 0) parts.push(`${((tokens - 1) / decodeS).toFixed(1)} tokens/s`);
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    else parts.push(`${chunks} tokens received`);
  } else if (outcome === "stopped") {
    parts.push("before the first token");
  }
  parts.push(`${seconds((ended - started) / 1000)} in all`);
  if (finishReason === "length") parts.push("cut at max tokens");
  if (finishReason === "stop") parts.push("finished");
  return parts.join(" · ");
}

function stop() {
  if (!state.active) return;
  state.active.stopped = true;
  state.active.controller.abort();
  setStatus("Stopping…");
}

function clear() {
  if (state.active) return;
  if (state.mode === "chat") state.history = [];
  transcript().replaceChildren();
  setStatus(state.mode === "chat" ? "Conversation cleared." : "Completions cleared.");
  ui.prompt.focus();
}

function setMode(mode) {
  state.mode = mode;
  ui.transcripts.chat.hidden = mode !== "chat";
  ui.transcripts.completion.hidden = mode !== "completion";
  document.body.classList.toggle("completion-mode", mode === "completion");
  ui.prompt.placeholder = mode === "chat" ? "Message the model" : "Text for the model to continue";
  ui.promptLabel.textContent = mode === "chat" ? "Message" : "Prompt";
}

// ---------------------------------------------------------------- start

function wire() {
  ui.key.value = apiKey();
  ui.key.addEventListener("input", () => {
    const key = ui.key.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    state.keyRejected = false;
    renderKeyPanel();
  });
  ui.key.addEventListener("change", refreshModels);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // never a navigation: the key must not reach the address bar
    refreshModels();
    ui.prompt.focus();
  });
  ui.keyForget.addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    ui.key.value = "";
    renderKeyPanel();
    refreshModels();
    ui.key.focus();
  });
  ui.model.addEventListener("change", () => {
    sessionStorage.setItem(MODEL_STORAGE, ui.model.value);
    renderModelState();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => radio.checked && setMode(radio.value));
  }
  ui.send.addEventListener("click", send);
  ui.stopButton.addEventListener("click", stop);
  ui.clear.addEventListener("click", clear);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.active) stop();
  });
  if (window.matchMedia("(min-width: 860px)").matches) ui.sampling.open = true;
}

async function start() {
  wire();
  setMode("chat");
  await fetchHealth();
  await refreshModels();
  setStatus("Ready.");
  // Keep the picker's states fresh while idle; the wake watcher polls faster while a request waits.
  setInterval(() => {
    if (!state.active && !document.hidden) refreshModels();
  }, IDLE_REFRESH_MS);
}

start();
