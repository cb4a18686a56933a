// The playground: pick a model, chat or complete with streaming answers, and watch a model wake from zero.
// Talks to the service's OpenAI routes with relative URLs, so it works under any route prefix.
import { AnswerView } from "./answer.js";
import { explain, readError, sentence } from "./errors.js";
import { SSEParser } from "./sse.js";
import { WakeWatcher, reportPhases, seconds, sumPhases } from "./wake.js";

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
  const view = new AnswerView(transcript(), scrollToEnd, model, chat ? undefined : text);
  const controller = new AbortController();
  const active = { controller, stopped: false };
  state.active = active;
  setBusy(true);
  setStatus(`Sent to ${model}. Waiting for the first token…`);

  const started = performance.now();
  const watcher = new WakeWatcher({
    model,
    entry: state.models.find((m) => m.id === model),
    view,
    startedAt: started,
    fetchModels,
    onModel: updateModel,
    announce: setStatus,
  });
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
      showError(view, explain(err.failure, Boolean(apiKey())), err.failure.retryAfter);
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
