// What went wrong, read from the service's answer and put in words that say what to do next.

export async function readError(response) {
  let message = "";
  let param = null;
  try {
    const body = await response.json();
    const error = body.error || body;
    message = typeof error === "string" ? error : error.message || body.detail || "";
    param = error.param || null;
  } catch {
    message = "";
  }
  return {
    status: response.status,
    message,
    param,
    retryAfter: response.headers.get("Retry-After"),
    requestId: response.headers.get("x-request-id"),
  };
}

export function sentence(text) {
  const t = (text || "").trim();
  return t === "" ? "" : /[.!?]$/.test(t) ? `${t} ` : `${t}. `;
}

/** What went wrong, in words that say what to do next. */
export function explain(error, hasKey) {
  const said = sentence(error.message);
  const ref = error.requestId ? ` (request id ${error.requestId})` : "";
  switch (error.status) {
    case 401:
      return hasKey
        ? "The service did not accept your API key. Check the key in the API key field at the top and send again."
        : "This service needs an API key. Paste it in the API key field at the top and send again.";
    case 404:
      return `The service does not serve this model. ${said}Pick a model from the list (it has just been refreshed).`;
    case 413:
      return `Too large for this service. ${said}Shorten the message, clear the conversation, or ask for fewer tokens.`;
    case 400:
    case 422:
      return `The service refused the request. ${said}${error.param ? `Check “${error.param}”, ` : "Change the setting it names, "}then send again.`;
    case 429:
    case 503: {
      const wait = Number(error.retryAfter);
      const when = Number.isFinite(wait) && wait > 0 ? `Try again in ${wait} s` : "Try again in a moment";
      return `The service is at capacity. ${said}${when} (the service asked for that wait).`;
    }
    case 504:
      return `No answer within the service's time limit. ${said}A model waking from zero may be ready now: send again, or ask for fewer tokens.`;
    default:
      if (error.status >= 500) return `The service failed (HTTP ${error.status}). ${said}Send again; if it keeps failing, its log has the details${ref}.`;
      return `The request failed (HTTP ${error.status}). ${said}`;
  }
}
