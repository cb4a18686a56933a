// The model picker: the models and their states from /v1/models (or /healthz before a key is given), the
// chosen model's state and last wake-up, and the notice when it is not running.
import { apiKey, headers, renderKeyPanel } from "./apikey.js";
import { ROUTES, state, ui, url } from "./page.js";
import { showNotice } from "./status.js";
import { reportPhases, seconds, sumPhases } from "./wake.js";

const STATE_LABELS = {
  running: "running",
  starting: "starting",
  scaled_to_zero: "at zero",
  evicted: "evicted",
};
const MODEL_STORAGE = "playground.model";
const IDLE_REFRESH_MS = 5000;

export async function fetchModels() {
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

export async function fetchHealth() {
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

export async function refreshModels() {
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

export function updateModel(entry) {
  const index = state.models.findIndex((m) => m.id === entry.id);
  if (index === -1) return;
  state.models[index] = entry;
  const option = [...ui.model.options].find((o) => o.value === entry.id);
  if (option) option.textContent = `${entry.id} (${STATE_LABELS[entry.state] || entry.state})`;
  if (entry.id === ui.model.value) renderModelState();
}

export function renderModelState() {
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

/** Remember the chosen model for this tab. */
export function wireModelPicker() {
  ui.model.addEventListener("change", () => {
    sessionStorage.setItem(MODEL_STORAGE, ui.model.value);
    renderModelState();
  });
}

/** Keep the picker's states fresh while idle; the wake watcher polls faster while a request waits. */
export function keepModelsFresh() {
  setInterval(() => {
    if (!state.active && !document.hidden) refreshModels();
  }, IDLE_REFRESH_MS);
}
