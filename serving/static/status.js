// What the page tells the person in words: the status line under the message box, the notice above the
// transcript, and an error under an answer.
import { ui } from "./page.js";
import { scrollToEnd } from "./transcript.js";

export function setStatus(text) {
  ui.status.textContent = text;
}

export function showNotice(text) {
  ui.zeroNotice.textContent = text.replace(/\s+/g, " ");
  ui.zeroNotice.hidden = false;
}

export function showError(view, text, retryAfter) {
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
