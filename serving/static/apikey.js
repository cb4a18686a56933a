// The API key: kept in this tab's session storage, sent as a Bearer token, and the panel that asks for it.
import { $, state, ui } from "./page.js";

const KEY_STORAGE = "playground.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function headers() {
  const h = { "Content-Type": "application/json", Accept: "application/json, text/event-stream" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

export function renderKeyPanel() {
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

/** Fill the key field and listen to it; refresh() reads the models again with the key as it now is. */
export function wireKeyPanel(refresh) {
  ui.key.value = apiKey();
  ui.key.addEventListener("input", () => {
    const key = ui.key.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    state.keyRejected = false;
    renderKeyPanel();
  });
  ui.key.addEventListener("change", refresh);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // never a navigation: the key must not reach the address bar
    refresh();
    ui.prompt.focus();
  });
  ui.keyForget.addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    ui.key.value = "";
    renderKeyPanel();
    refresh();
    ui.key.focus();
  });
}
