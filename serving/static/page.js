// What every part of the playground shares: the page's elements, its state, and the service's routes.

// Relative to the page, never to the host's root: the service may sit under a route prefix.
export const ROUTES = {
  models: "v1/models",
  health: "healthz",
  chat: "v1/chat/completions",
  completions: "v1/completions",
};

export const $ = (id) => document.getElementById(id);
export const url = (path) => new URL(path, document.baseURI).toString();

export const ui = {
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

export const state = {
  auth: "unknown", // "required" | "none" | "unknown", from /healthz
  keyRejected: false,
  models: [],
  mode: "chat",
  history: [], // chat messages sent and answered, in order
  active: null, // the request in flight: {controller, stopped}
};
