// Server-sent events over fetch: a parser that takes the response body's bytes in whatever pieces the
// network delivers them (a line, a character, even half of a UTF-8 character) and hands back whole events.
// EventSource cannot be used: it only does GET and cannot send an Authorization header.

/**
 * Incremental SSE parser (the subset of the WHATWG algorithm that OpenAI-style streams use).
 *
 *   const parser = new SSEParser({onData: (text) => ..., onComment: (text) => ...});
 *   parser.push(uint8Array);   // as many times as chunks arrive
 *   parser.end();              // once the body is finished: dispatches a last event with no blank line
 *
 * onData gets the event's data (several `data:` lines joined with "\n"); onComment gets a comment line's
 * text without its leading ":" and one space.
 */
export class SSEParser {
  constructor({ onData, onComment = () => {} }) {
    this.onData = onData;
    this.onComment = onComment;
    // stream: true keeps a multi-byte character that straddles two chunks until its last byte arrives.
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";
    this.data = [];
  }

  push(bytes) {
    this.feed(this.decoder.decode(bytes, { stream: true }));
  }

  end() {
    this.feed(this.decoder.decode());
    if (this.buffer) {
      this.line(this.buffer);
      this.buffer = "";
    }
    this.dispatch();
  }

  feed(text) {
    this.buffer += text;
    // Lines end with \n, \r\n or \r. A trailing \r may be the first half of \r\n: keep it for the next chunk.
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const ch = this.buffer[i];
      if (ch !== "\n" && ch !== "\r") continue;
      if (ch === "\r" && i === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, i));
      if (ch === "\r" && this.buffer[i + 1] === "\n") i++;
      start = i + 1;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(text) {
    if (text === "") {
      this.dispatch();
      return;
    }
    if (text.startsWith(":")) {
      this.onComment(text.slice(1).replace(/^ /, ""));
      return;
    }
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    const value = colon === -1 ? "" : text.slice(colon + 1).replace(/^ /, "");
    if (field === "data") this.data.push(value);
    // event:, id: and retry: carry nothing the OpenAI streams use.
  }

  dispatch() {
    if (this.data.length === 0) return;
    const data = this.data.join("\n");
    this.data = [];
    this.onData(data);
  }
}
