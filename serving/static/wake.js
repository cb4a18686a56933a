// Cold starts on the page: the phases a replica reports, drawn as a list with bars, and the watcher that
// follows a model's wake-up while a request waits for its first token.

const WAKE_POLL_MS = 500;

export const PHASES = [
  ["process_start", "Process start"],
  ["imports", "Imports"],
  ["model_code", "Model code"],
  ["weights", "Weights"],
  ["warmup", "Warm-up"],
  ["first_generation", "First generation"],
];

/** A cold-start report's phases: `phases` as the API documents it, or `<phase>_s` keys at its top level. */
export function reportPhases(report) {
  if (report.phases) return report.phases;
  const phases = {};
  for (const [name] of PHASES) {
    if (typeof report[`${name}_s`] === "number") phases[`${name}_s`] = report[`${name}_s`];
  }
  return phases;
}

export function sumPhases(phases) {
  return Object.values(phases).reduce((sum, value) => sum + value, 0);
}

export function phaseList(phases, current, live) {
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

export function seconds(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "?";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

/**
 * While a request waits for its first token, poll /v1/models for the model's `waking` progress and show it.
 * After the first token, read the finished cold-start report and leave its phase breakdown on the answer.
 */
export class WakeWatcher {
  /**
   * entry: the model's last known listing; fetchModels(): the current listing (or null);
   * onModel(entry): a fresher entry was read; announce(text): a completed phase, for the status line.
   */
  constructor({ model, entry, view, startedAt, fetchModels, onModel, announce }) {
    this.model = model;
    this.view = view;
    this.startedAt = startedAt;
    this.fetchModels = fetchModels;
    this.onModel = onModel;
    this.say = announce;
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
    const models = await this.fetchModels();
    if (this.stopped || !models) return;
    const entry = models.find((m) => m.id === this.model);
    if (!entry) return;
    this.onModel(entry);
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
      this.say(`Waking ${this.model}: ${label.toLowerCase()} done in ${seconds(value)}.`);
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
    } else {
      this.view.hideWake();
    }
  }

  /**
   * The first token came: stop watching and, if this request woke the model, show how the wake-up went.
   * The replica's report is complete (first generation included, `finished_at` set) only once its first
   * request has ended, so a partial report is shown first and replaced by the complete one when it comes.
   */
  async firstToken(waitedS) {
    this.halt();
    if (!(this.seen || this.expectCold)) return;
    const deadline = performance.now() + 120000;
    let shown = null;
    while (performance.now() < deadline) {
      const models = await this.fetchModels();
      const entry = models && models.find((m) => m.id === this.model);
      if (entry) this.onModel(entry);
      const last = entry && entry.last_cold_start;
      const text = JSON.stringify(last);
      if (last && text !== this.previousReport && text !== shown) {
        shown = text;
        this.view.showWakeSummary(this.model, last, waitedS);
        if (last.finished_at) return;
      }
      await new Promise((resolve) => setTimeout(resolve, WAKE_POLL_MS));
    }
    // Without a fresh report, keep what was seen while waiting: the phases that had completed.
    if (shown === null) {
      this.view.showWakeSummary(this.model, { phases: (this.waking && this.waking.phases) || {} }, waitedS);
    }
  }
}
