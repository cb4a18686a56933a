"""``POST /v1/completions``: the legacy completions dialect (text prompts, echo, legacy logprobs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from engine.types import Completion, Delta, GenerationRequest, Started, TokenLogprob
from serving.api.errors import invalid_value, unsupported
from serving.api.openai import OpenAIDialect, StreamState
from serving.api.openai_params import sampling_fields
from serving.api.openai_responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    finish_reason,
)
from serving.api.openai_schemas import CompletionRequest
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int, unscored: int = 0) -> CompletionLogprobs:
    """The legacy logprobs of ``logprobs``, their text offsets counted from ``offset``. The first
    ``unscored`` entries (an echoed prompt's first token) have no log-probability: null."""
    offsets = []
    for entry in logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in logprobs],
        token_logprobs=[e.logprob if i >= unscored else None for i, e in enumerate(logprobs)],
        top_logprobs=[_top_by_text(e.top) if i >= unscored else None for i, e in enumerate(logprobs)],
        text_offset=offsets,
    )


def _top_by_text(top: Sequence) -> dict[str, float]:
    """The legacy format keys alternatives by their text: two tokens that decode alike (two halves of a
    multi-byte character both read "\ufffd") share one key, which keeps the likelier (first) of them."""
    by_text: dict[str, float] = {}
    for alt in top:
        by_text.setdefault(alt.token, alt.logprob)
    return by_text


def _prompts(prompt: Any) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Text prompts, or token-id prompts (a list of ints is one prompt, a list of such lists several)."""
    if isinstance(prompt, str):
        return (prompt,), ()
    if not prompt:  # [] passes the schema as an empty list of token ids
        raise invalid_value("prompt", "send a prompt (the list is empty)")
    if isinstance(prompt[0], str):
        return tuple(prompt), ()
    if isinstance(prompt[0], int):
        return (), (tuple(prompt),)
    if any(not ids for ids in prompt):
        raise invalid_value("prompt", "a token-id prompt is empty; send at least one id")
    return (), tuple(tuple(ids) for ids in prompt)


def echoed(request: GenerationRequest, started: Started | None, row: int) -> str:
    """The prompt of ``row`` as echo shows it (a token-id prompt: its decoded text)."""
    prompt = row // request.n
    if started is not None and started.prompt_texts is not None:
        return started.prompt_texts[prompt]
    return request.prompts[prompt]


def prompt_entries(started: Started | None, request: GenerationRequest, row: int) -> tuple:
    if started is None or started.prompt_logprobs is None:
        return ()
    return started.prompt_logprobs[row // request.n]


class CompletionsDialect(OpenAIDialect[CompletionRequest]):
    id_prefix = "cmpl"
    chunk_type = CompletionChunk

    def _translate(
        self, body: CompletionRequest, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest:
        prompts, token_prompts = _prompts(body.prompt)
        if body.suffix is not None:
            raise unsupported("suffix", "insertion (suffix) is not supported; remove it")
        if body.best_of is not None and body.best_of != body.n:
            raise unsupported("best_of", f"only best_of == n is supported (got best_of={body.best_of}, n={body.n})")
        # Token-id prompts count against MAX_PROMPTS_PER_REQUEST here, and MAX_PROMPT_TOKENS in the replica.
        check_limits(prompts or [""] * len(token_prompts), body.n, settings)
        params = sampling_params(
            model,
            max_new_tokens=body.max_tokens,
            **sampling_fields(body),
            logprobs=body.logprobs,
        )
        if body.echo and body.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        return GenerationRequest(request_id, params, prompts=prompts, n=body.n, token_prompts=token_prompts)

    def response(
        self,
        body: CompletionRequest,
        model: ModelConfig,
        request: GenerationRequest,
        started: Started,
        done: list[Completion],
    ) -> CompletionResponse:
        choices = []
        for row, completion in enumerate(done):
            prefix = echoed(request, started, row) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._logprobs(request, started, row, completion.logprobs)
            choices.append(
                CompletionChoice(
                    index=row,
                    text=prefix + completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,  # type: ignore[arg-type]
                )
            )
        return CompletionResponse(choices=choices, **self._answer_fields(model, request, started, done))

    def _logprobs(
        self, request: GenerationRequest, started: Started | None, row: int, generated: Sequence[TokenLogprob]
    ) -> CompletionLogprobs:
        """A row's legacy logprobs: the echoed prompt's tokens first (with echo), then the generated ones."""
        prompt = prompt_entries(started, request, row)
        return completion_logprobs((*prompt, *generated), 0, unscored=1 if prompt else 0)

    # --- streaming ---------------------------------------------------------------------------------
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[CompletionChoice]]:
        state.rows[row] = 0  # the text offset of the row's next token
        if state.body.echo:
            prompt = echoed(state.request, state.started, row)
            logprobs = None
            if state.body.logprobs is not None:
                logprobs = self._logprobs(state.request, state.started, row, ())
                state.rows[row] = sum(len(t) for t in logprobs.tokens)
            else:
                state.rows[row] = len(prompt)
            yield [CompletionChoice(index=row, text=prompt, logprobs=logprobs, finish_reason=None)]

    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[CompletionChoice]]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return
        logprobs = None
        if state.body.logprobs is not None:
            logprobs = completion_logprobs(delta.logprobs, state.rows.get(delta.index, 0))
        state.rows[delta.index] = state.rows.get(delta.index, 0) + len(delta.text)
        reason = finish_reason(delta)
        yield [CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=reason)]


COMPLETIONS = CompletionsDialect()
