"""Request and response models of the native API (``/generate``, ``/healthz``), declared once."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from engine.types import MAX_SEED, MAX_TOP_K

Prompt = Annotated[str, StringConstraints(min_length=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class GenerationKwargs(BaseModel):
    """Per-request generation options; an option left out takes the service default (echoed back)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate at most (capped by MAX_NEW_TOKENS_LIMIT)."
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy and deterministic.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling: keep this much mass.")
    top_k: int | None = Field(
        default=None, ge=0, le=MAX_TOP_K, description="Keep the k most likely tokens; 0 disables."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, description="Above 1 discourages repeating tokens; 1 disables."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Makes sampling reproducible; every prompt uses this seed."
    )
    stop: list[StopString] | None = Field(
        default=None,
        max_length=8,
        description="Generation ends when one of these strings appears; it is not part of the completion.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class GenerateRequest(BaseModel):
    """Either one ``prompt`` or a list of ``prompts``, with optional ``generation_kwargs``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Write a haiku about Ray Serve.",
                    "generation_kwargs": {"max_new_tokens": 64, "temperature": 0.6, "top_p": 0.95},
                },
                {"prompts": ["Return the", "The socket module"], "generation_kwargs": {"temperature": 0}},
            ]
        },
    )

    model: str | None = Field(
        default=None, min_length=1, description="Which served model (see GET /v1/models); optional with one model."
    )
    prompt: Prompt | None = Field(default=None, description="One prompt.")
    prompts: list[Prompt] | None = Field(default=None, min_length=1, description="Several prompts, batched.")
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    stream: bool = Field(
        default=False,
        description="Answer with server-sent events: `delta` events with each prompt's new text, then one `done` "
        "event holding the same body as the non-streamed answer.",
    )

    @model_validator(mode="after")
    def _exactly_one_prompt_field(self) -> GenerateRequest:
        if self.prompt is None and self.prompts is None:
            raise ValueError("send a 'prompt' (string) or 'prompts' (list of strings)")
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("send either 'prompt' or 'prompts', not both")
        return self

    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    """Completions in prompt order; each is the generated text only, never the prompt."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "models/pydoc-gpt-mini",
                    "prompts": ["Return the"],
                    "completions": [" number of bytes in the buffer."],
                    "finish_reasons": ["stop"],
                    "generation_kwargs": {
                        "max_new_tokens": 64,
                        "temperature": 0.0,
                        "top_p": 0.9,
                        "top_k": 0,
                        "repetition_penalty": 1.0,
                        "seed": None,
                        "stop": [],
                    },
                    "usage": {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10},
                }
            ]
        }
    )

    model: str
    prompts: list[str]
    completions: list[str]
    finish_reasons: list[Literal["stop", "length"]] = Field(
        description="stop: end of text or a stop string; length: max_new_tokens reached."
    )
    generation_kwargs: dict[str, Any] = Field(description="The values actually used, defaults included.")
    usage: Usage


class HealthResponse(BaseModel):
    """The Gateway's own answer; asking never starts a model replica."""

    status: Literal["ok"]
    auth: Literal["required", "none"] = Field(description="Whether /generate and /v1 need an API key.")
    models: list[dict[str, Any]] = Field(description="Every served model with its state (as in GET /v1/models).")


class ErrorDetail(BaseModel):
    code: int
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
