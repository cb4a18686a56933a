"""Transport-neutral types: what a request asks for and what the engine streams back.

No torch, no Ray, no HTTP: the Gateway imports this module to build requests and to read the
model server's stream, the model server passes the same objects to the engine, and they cross a
Ray Serve handle pickled as they are. The engine's one primitive is a stream of :class:`Delta`
per row; a non-streamed answer is that stream collected (:func:`collect`)::

    >>> request = GenerationRequest("req-1", SamplingParams(max_new_tokens=4), prompts=("Hi",), n=2)
    >>> request.rows, request.row_params(1).seed is None
    (2, True)
    >>> deltas = [Delta(0, "He", 1), Delta(1, "Yo", 1, finish_reason="length"), Delta(0, "y", 1, finish_reason="stop")]
    >>> [c.text for c in collect(deltas, rows=2, prompt_tokens=(1, 1))]
    ['Hey', 'Yo']
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, NamedTuple, TypeVar

# stop: end of text or a stop string; length: max_new_tokens or the context; cancelled: the
# caller went away; error: this row failed alone (its sampling, detokenizer, stop strings, scores);
# aborted: the engine step that held it failed (out of memory...), retryable. The last three are
# never sent to a client as finish reasons: the model server turns the last two into errors.
FinishReason = Literal["stop", "length", "cancelled", "error", "aborted"]
MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1  # the schemas' bound; the engine also clamps top_k to the vocabulary
# A temperature below this samples as greedy: in float32 the scaled scores overflow (or the
# distribution is a point mass anyway), and an overflowed row would pick an arbitrary token.
MIN_SAMPLING_TEMPERATURE = 1e-5
Role = Literal["system", "user", "assistant", "tool"]
T = TypeVar("T")


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match, compiled by the engine into a grammar (``engine.constraints``).

    ``kind``: ``json_schema`` (``spec`` is the schema as JSON text; ``strict`` False lets objects
    carry properties the schema does not list), ``json_object`` (any JSON object), ``regex``,
    ``choice`` (``spec`` is a JSON list of the allowed strings) or ``grammar`` (EBNF).

        >>> Constraint("json_object").key
        ('json_object', '', True)
    """

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    spec: str = ""
    strict: bool = True
    param: str = "response_format"  # the request field it came from, named in a refusal

    @property
    def key(self) -> tuple[str, str, bool]:
        return (self.kind, self.spec, self.strict)


@dataclass(frozen=True)
class SamplingParams:
    """Generation parameters with every default filled in, as one row decodes them.

    ``logprobs``: None for none; k >= 0 for the chosen token's log-probability plus the k most
    likely alternatives at each step. Log-probabilities are those of the model's raw
    distribution, before temperature, penalties and top-k/top-p (vLLM's ``raw_logprobs``).

    Example::

        >>> SamplingParams(max_new_tokens=16, temperature=0.0).greedy
        True
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    # Per-row logits processors (``engine.processors``); the defaults cost a row nothing.
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids barred, stop strings not matched, until this many tokens
    stop_token_ids: tuple[int, ...] = ()  # more ids that end the row, like EOS (not shown in the text)
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (after temperature)
    constraint: Constraint | None = None
    prompt_logprobs: int | None = None  # each prompt token's log-probability, with this many alternatives

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one too small to sample with in float32."""
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant made: ``arguments`` is the JSON text of its arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat. An assistant's may carry ``tool_calls``; a ``tool`` message answers the
    call ``tool_call_id`` (and names the function in ``name`` when the client gave it)."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One call to a model server: prompts (or a chat) and how to continue them.

    Rows are numbered prompt by prompt, ``n`` choices each: row ``p * n + c`` is choice ``c`` of
    prompt ``p``. A chat (``messages``) is one prompt, rendered by the model server with the
    model's chat template. With a seed, choice ``c`` samples with ``seed + c``, so that the ``n``
    choices differ and each one reproduces.
    """

    request_id: str
    params: SamplingParams
    prompts: tuple[str, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    n: int = 1
    token_prompts: tuple[tuple[int, ...], ...] = ()  # prompts given as token ids, used as they are
    tools: str | None = None  # a chat's tools, the JSON text of OpenAI's list, for the chat template

    def __post_init__(self) -> None:
        if sum(map(bool, (self.prompts, self.messages, self.token_prompts))) != 1:
            raise ValueError("a GenerationRequest has either prompts, token prompts or messages")
        if self.n < 1:
            raise ValueError("n must be at least 1")

    @property
    def num_prompts(self) -> int:
        return len(self.prompts or self.token_prompts) or 1

    @property
    def rows(self) -> int:
        return self.num_prompts * self.n

    def row_params(self, row: int) -> SamplingParams:
        choice = row % self.n
        if choice == 0 or self.params.seed is None:
            return self.params
        # Seeds stay within 0..2**63-1 (what torch's generators take): seed + c wraps around.
        return replace(self.params, seed=(self.params.seed + choice) % (MAX_SEED + 1))

    def row_inputs(self, per_prompt: Sequence[T]) -> list[tuple[T, SamplingParams]]:
        """Each row's prompt (``per_prompt`` holds one per prompt, e.g. its token ids) and parameters.

        >>> request = GenerationRequest("r", SamplingParams(4, temperature=1.0, seed=7), prompts=("a", "b"), n=2)
        >>> [(prompt, params.seed) for prompt, params in request.row_inputs(["A", "B"])]
        [('A', 7), ('A', 8), ('B', 7), ('B', 8)]
        """
        if len(per_prompt) != self.num_prompts:
            raise ValueError(f"{len(per_prompt)} prompt inputs for a request of {self.num_prompts} prompts")
        return [(per_prompt[row // self.n], self.row_params(row)) for row in range(self.rows)]


class TopLogprob(NamedTuple):
    """One alternative at a step (a named tuple: an answer holds tens of thousands, built again on
    every hop, and a tuple builds in a third of a frozen dataclass's time)."""

    token: str  # the token's text; a token that is part of a character shows what decodes of it
    bytes: tuple[int, ...]  # the token's exact UTF-8 bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token and the most likely alternatives at its step (``top``, best first)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()

    def __reduce__(self) -> tuple:
        """Pickled as columns, byte strings for byte tuples: an answer of n x tokens x 20 alternatives crosses
        from the replica to the Gateway as a few objects per entry (4x faster to write than field by field),
        and is read back by :func:`_token_logprob`, Python code between whose calls other threads get the GIL.

        >>> import pickle
        >>> entry = TokenLogprob("a", (97,), -0.5, (TopLogprob("a", (97,), -0.5), TopLogprob("é", (195, 169), -2.0)))
        >>> pickle.loads(pickle.dumps(entry)) == entry
        True
        """
        top = self.top
        columns = (tuple(a.token for a in top), tuple(bytes(a.bytes) for a in top), tuple(a.logprob for a in top))
        return _token_logprob, (self.token, bytes(self.bytes), self.logprob, *columns)


def _token_logprob(
    token: str, raw: bytes, logprob: float, tokens: tuple[str, ...], raws: tuple[bytes, ...], scores: tuple[float, ...]
) -> TokenLogprob:
    if not len(tokens) == len(raws) == len(scores):
        raise ValueError("log-probability columns of different lengths")
    top = tuple(map(TopLogprob, tokens, map(tuple, raws), scores))
    return TokenLogprob(token, tuple(raw), logprob, top)


@dataclass(frozen=True)
class Delta:
    """What one row produced since its last delta.

    ``text`` holds whole characters only and never any part of a stop string (text that could
    begin one is held back until it cannot). ``tokens`` counts the tokens this delta covers, and
    ``logprobs`` has one entry per token when the request asked for them. The last delta of a
    row carries its ``finish_reason``.
    """

    index: int
    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None  # with finish_reason error/aborted: what failed, in words, no internals

    @staticmethod
    def joined(deltas: Sequence[Delta]) -> Delta:
        """Consecutive deltas of one row as one (what a reader receives for the steps since its last read).

        >>> Delta.joined([Delta(0, "Hel", 1), Delta(0, "lo", 2, finish_reason="length")])
        Delta(index=0, text='Hello', tokens=3, logprobs=(), finish_reason='length', error=None)
        """
        first, last = deltas[0], deltas[-1]
        if len(deltas) == 1:
            return first
        if any(d.index != first.index for d in deltas):
            raise ValueError(f"cannot join deltas of rows {sorted({d.index for d in deltas})}")
        return Delta(
            first.index,
            "".join(d.text for d in deltas),
            sum(d.tokens for d in deltas),
            tuple(itertools.chain.from_iterable(d.logprobs for d in deltas)),
            last.finish_reason,
            last.error,
        )


@dataclass(frozen=True)
class Started:
    """The first item of every stream: the model server has taken the request.

    ``queue_s`` is how long the request waited in the replica before the engine took it;
    ``cold_start`` is the replica's start-up report, sent with the first request it serves.
    """

    replica: str
    prompt_tokens: tuple[int, ...]  # per prompt (a chat is one prompt)
    queue_s: float = 0.0
    cold_start: dict[str, Any] | None = None
    # Per prompt, with params.prompt_logprobs: each prompt token's entry. The first token has no
    # log-probability (nothing precedes it): its entry gives its text only (logprob 0, no alternatives).
    prompt_logprobs: tuple[tuple[TokenLogprob, ...], ...] | None = None
    prompt_texts: tuple[str, ...] | None = None  # token-id prompts decoded, for echo


# What a model server's stream yields: a Started, then batches of deltas in the order produced.
StreamItem = Started | tuple[Delta, ...]


@dataclass(frozen=True)
class Completion:
    """One row's result: the generated text only (never the prompt) and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = field(default=())


def collect(deltas: Iterable[Delta], rows: int, prompt_tokens: Sequence[int], n: int = 1) -> list[Completion]:
    """Join each row's deltas into its :class:`Completion` (rows in order; ``n`` rows per prompt)."""
    texts: list[list[str]] = [[] for _ in range(rows)]
    tokens = [0] * rows
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
    reasons: list[FinishReason | None] = [None] * rows
    for delta in deltas:
        texts[delta.index].append(delta.text)
        tokens[delta.index] += delta.tokens
        logprobs[delta.index].extend(delta.logprobs)
        if delta.finish_reason is not None:
            reasons[delta.index] = delta.finish_reason
    missing = [row for row, reason in enumerate(reasons) if reason is None]
    if missing:
        raise RuntimeError(f"the stream ended before rows {missing} finished")
    return [
        Completion(
            text="".join(texts[row]),
            prompt_tokens=prompt_tokens[row // n],
            completion_tokens=tokens[row],
            finish_reason=reasons[row],  # type: ignore[arg-type]
            logprobs=tuple(logprobs[row]),
        )
        for row in range(rows)
    ]
