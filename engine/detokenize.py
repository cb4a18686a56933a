"""Incremental detokenization: the text of one row, released token by token, safely.

Decoding every generated token again at each step costs O(length) per step; decoding a token
alone breaks characters that span tokens (byte-level BPE splits 日 or an emoji over several) and
loses the spaces that SentencePiece attaches to a token's start. The technique of vLLM's and
TGI's ``detokenize_incrementally`` avoids both: decode a short window of the latest tokens,
starting one emitted chunk back so that the tokenizer sees the context it needs, and release the
part of the window's text that is new. Text is released only up to the last whole character
(an incomplete UTF-8 sequence decodes to U+FFFD and waits for its next byte), and never a part of
a stop string: the longest tail of the text that could begin one is held back until the next
tokens show whether it does. When a stop string appears the row ends, and its text is cut just
before it. With ``min_tokens``, as in vLLM, a stop string that ends within the text of the row's
first ``min_tokens`` tokens does not count (it stays in the text); one that ends after it does.

Invariant (property-tested in ``tests/unit/test_detokenize.py``): the pieces returned by ``add``
and ``flush`` join to ``tokenizer.decode(ids, skip_special_tokens=True)`` of every token added,
cut before the first stop string (the first that ends past the first ``min_tokens`` tokens' text).

Decoding never applies ``clean_up_tokenization_spaces`` (a rewrite of earlier text, e.g. " ." to
".", that no incremental scheme can honour); transformers' fast BPE tokenizers never apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what an incomplete (or invalid) UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """One row's text, released as tokens arrive.

    Example (a tokenizer whose every byte is one token)::

        >>> detok = IncrementalDetokenizer(BytesTokenizer(), stop=("END",))
        >>> [detok.add(b) for b in "é!E".encode()]  # é is two bytes; E might begin END
        ['', 'é', '!', '']
        >>> detok.add(ord("N")), detok.add(ord("D")), detok.stopped
        ('', '', True)
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0, skip_special_tokens: bool = True
    ) -> None:
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.stopped = False  # a stop string appeared: nothing more is released
        self._prefix = 0  # the window decoded at each step is ids[_prefix:]
        self._read = 0  # ids before this index are fully released
        self._sent = 0  # characters of the window's text already passed on
        self._held = ""  # released by the tokenizer, held back as a possible stop-string start
        self._total = 0  # characters passed to _release so far (held ones included)
        self._free = 0  # characters of the first min_tokens tokens: no stop string may end within them

    def add(self, token_id: int) -> str:
        """Take the next token; return the text that is now safe to show (often '')."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        window = self._decode(self.ids[self._prefix :])
        # Trailing U+FFFD may be a character still missing bytes: release up to it, not past it.
        stable = len(window.rstrip(REPLACEMENT))
        new = window[self._sent : stable] if stable > self._sent else ""
        self._sent = max(self._sent, stable)
        if stable == len(window):
            # The window ends on a whole character: slide it to start at the tokens just released,
            # unless they have no text (special tokens skipped), which gives the decoder no context.
            tail = self._decode(self.ids[self._read :])
            if tail:
                self._prefix, self._sent = self._read, len(tail)
            else:
                self._sent = len(window)
            self._read = len(self.ids)
        return self._release(new, final=False)

    def flush(self) -> str:
        """The row has ended: release what was held (an incomplete character shows as U+FFFD)."""
        if self.stopped:
            return ""
        window = self._decode(self.ids[self._prefix :])
        rest = window[self._sent :]
        self._sent = len(window)
        return self._release(rest, final=True)

    def _release(self, new: str, final: bool) -> str:
        if not self.stop:
            return new
        text = self._held + new
        begins = self._total - len(self._held)  # where ``text`` begins in the row's text
        self._total += len(new)
        if len(self.ids) <= self.min_tokens:
            self._free = self._total
        free = self._free - begins  # a stop string must end past this point of ``text``
        cut = min((i for i in (text.find(s, max(0, free - len(s) + 1)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0 if final else _longest_stop_prefix(text, self.stop)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """``tokenizer.decode`` without clean-up, straight from the Rust tokenizer where that is all it does.

    transformers' fast tokenizers decode with ``backend_tokenizer.decode`` plus an optional clean-up
    we never want; calling the backend directly saves two thirds of the time of each of the
    two decodes per token and row.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    implementation = getattr(type(tokenizer), "_decode", None)
    if backend is not None and getattr(implementation, "__qualname__", "") == "TokenizersBackend._decode":
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


class BytesTokenizer:
    """A tokenizer whose token ``b`` is the byte ``b`` (ids 0-255), for examples and tests."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return bytes(ids).decode("utf-8", errors="replace")
