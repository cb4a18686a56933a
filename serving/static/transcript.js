// The two transcripts, chat and completion: which one shows, the bubbles in it, keeping its end in sight.
import { state, ui } from "./page.js";

export function transcript() {
  return ui.transcripts[state.mode];
}

export function scrollToEnd(force = false) {
  const box = transcript();
  const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  if (force || nearEnd) box.scrollTop = box.scrollHeight;
  // On a phone the page itself scrolls: bring the transcript's end and the box below it into view.
  if (force) document.querySelector(".composer").scrollIntoView({ block: "nearest" });
}

export function addBubble(role, text) {
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

export function setMode(mode) {
  state.mode = mode;
  ui.transcripts.chat.hidden = mode !== "chat";
  ui.transcripts.completion.hidden = mode !== "completion";
  document.body.classList.toggle("completion-mode", mode === "completion");
  ui.prompt.placeholder = mode === "chat" ? "Message the model" : "Text for the model to continue";
  ui.promptLabel.textContent = mode === "chat" ? "Message" : "Prompt";
}
