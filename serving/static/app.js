// The playground: pick a model, chat or complete with streaming answers, and watch a model wake from zero.
// Talks to the service's OpenAI routes with relative URLs, so it works under any route prefix.
// This module starts the page; each part lives in a module of its own: page.js (elements, state, routes),
// apikey.js, models.js (the picker), sampling.js, transcript.js, status.js, send.js (send and stream),
// and below them answer.js, wake.js, sse.js, errors.js.
import { wireKeyPanel } from "./apikey.js";
import { fetchHealth, keepModelsFresh, refreshModels, wireModelPicker } from "./models.js";
import { ui } from "./page.js";
import { wireComposer } from "./send.js";
import { setStatus } from "./status.js";
import { setMode } from "./transcript.js";

function wire() {
  wireKeyPanel(refreshModels);
  wireModelPicker();
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => radio.checked && setMode(radio.value));
  }
  wireComposer();
  if (window.matchMedia("(min-width: 860px)").matches) ui.sampling.open = true;
}

async function start() {
  wire();
  setMode("chat");
  await fetchHealth();
  await refreshModels();
  setStatus("Ready.");
  keepModelsFresh();
}

start();
