// One answer in the transcript: the text as it streams in, the wake-up panel above it, the stats line below.
import { phaseList, reportPhases, seconds, sumPhases } from "./wake.js";

/** The view of one answer: its growing text, its wake-up panel, its stats line. */
export class AnswerView {
  /** container: where the answer goes; onGrow(force): keep the end of the transcript in sight. */
  constructor(container, onGrow, model, promptText) {
    this.onGrow = onGrow;
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
    container.append(this.root);
    onGrow(true);
  }

  get text() {
    return this.textNode.data;
  }

  append(text) {
    this.root.classList.add("started");
    this.textNode.appendData(text);
    this.onGrow(false);
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
