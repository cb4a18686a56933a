// The composer's actions: send a message or prompt and stream the answer in, stop it, clear the transcript.
import { AnswerView } from "./answer.js";
import { apiKey, headers, renderKeyPanel } from "./apikey.js";
import { explain, readError, sentence } from "./errors.js";
import { fetchModels, refreshModels, renderModelState, updateModel } from "./models.js";
import { ROUTES, state, ui, url } from "./page.js";
import { readParams } from "./sampling.js";
import { SSEParser } from "./sse.js";
import { setStatus, showError } from "./status.js";
import { addBubble, scrollToEnd, transcript } from "./transcript.js";
import { WakeWatcher, seconds } from "./wake.js";

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

/** Send, Stop and Clear, Enter to send (Shift+Enter for a new line), Esc to stop. */
export function wireComposer() {
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
}
