"""``POST /v1/completions``: the legacy completions dialect (text prompts, echo, legacy logprobs)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from engine.types import Completion, Delta, GenerationRequest, Started, TokenLogprob
from serving.api.openai import OpenAIDialect, StreamState, finish_reason, invalid_value, unsupported, usage
from serving.api.openai_responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from serving.api.openai_schemas import CompletionRequest
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for entry in logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in logprobs],
        token_logprobs=[e.logprob for e in logprobs],
        top_logprobs=[_top_by_text(e.top) for e in logprobs],
        text_offset=offsets,
    )


def _top_by_text(top: Sequence) -> dict[str, float]:
    """The legacy format keys alternatives by their text: two tokens that decode alike (two halves of a
    multi-byte character both read "\ufffd") share one key, which keeps the likelier (first) of them."""
    by_text: dict[str, float] = {}
    for alt in top:
        by_text.setdefault(alt.token, alt.logprob)
    return by_text


class CompletionsDialect(OpenAIDialect[CompletionRequest]):
    id_prefix = "cmpl"

    def _translate(
        self, body: CompletionRequest, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:  # [] passes the schema as an empty list of token ids
            raise invalid_value("prompt", "send a prompt (the list is empty)")
        if any(not isinstance(p, str) for p in prompts):
            raise unsupported("prompt", "token-id prompts are not supported; send the prompt as text")
        if body.suffix is not None:
            raise unsupported("suffix", "insertion (suffix) is not supported; remove it")
        if body.best_of is not None and body.best_of != body.n:
            raise unsupported("best_of", f"only best_of == n is supported (got best_of={body.best_of}, n={body.n})")
        if body.echo and body.logprobs is not None:
            raise unsupported("echo", "echo with logprobs (prompt log-probabilities) is not supported")
        check_limits(prompts, body.n, settings)  # type: ignore[arg-type]
        params = sampling_params(
            model,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=body.stop,
            logprobs=body.logprobs,
        )
        return GenerationRequest(request_id, params, prompts=tuple(prompts), n=body.n)  # type: ignore[arg-type]

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
            prefix = request.prompts[row // request.n] if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(completion.logprobs, len(prefix))
            choices.append(
                CompletionChoice(
                    index=row,
                    text=prefix + completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,  # type: ignore[arg-type]
                )
            )
        return CompletionResponse(
            id=f"{self.id_prefix}-{request.request_id}",
            created=int(time.time()),
            model=model.name,
            choices=choices,
            usage=usage(started, sum(c.completion_tokens for c in done)),
        )

    # --- streaming ---------------------------------------------------------------------------------
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[CompletionChoice]]:
        state.rows[row] = 0  # the text offset of the row's next token
        if state.body.echo:
            prompt = state.request.prompts[row // state.request.n]
            state.rows[row] = len(prompt)
            yield [CompletionChoice(index=row, text=prompt, finish_reason=None)]

    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[CompletionChoice]]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return
        logprobs = None
        if state.body.logprobs is not None:
            logprobs = completion_logprobs(delta.logprobs, state.rows.get(delta.index, 0))
        state.rows[delta.index] = state.rows.get(delta.index, 0) + len(delta.text)
        reason = finish_reason(delta)
        yield [CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=reason)]

    def _chunk(self, state: StreamState, choices: list, usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=state.id, created=state.created, model=state.model.name, choices=choices, usage=usage)


COMPLETIONS = CompletionsDialect()
