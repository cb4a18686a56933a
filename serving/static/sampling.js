// The sampling form: its fields read and checked before a request, the first wrong one opened and focused.
import { ui } from "./page.js";

/** The request's sampling parameters as `{params}`, or `{error}` with a sentence naming the wrong field. */
export function readParams() {
  for (const field of document.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
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
