"""Request and response models of the OpenAI-compatible routes, declared once.

Types and ranges are checked here (a violation is a 400 naming the field). Fields the OpenAI API
defines but this service does not implement are declared too, so that a request using them gets a
400 that names them (see ``serving.api.openai``) rather than being silently ignored. Unknown fields
are accepted and logged, as OpenAI and vLLM do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from engine.types import MAX_SEED, MAX_TOP_K
from serving.models import ModelState

Text = Annotated[str, StringConstraints(min_length=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Stop = StopString | Annotated[list[StopString], Field(max_length=8)] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(default=False, description="Send a last chunk with the token usage.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(default=None, description="true: objects carry exactly the listed properties.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema.")
    json_schema: JsonSchemaFormat | None = Field(default=None, description="With type json_schema: the schema.")


class OpenAIRequest(_Request):
    """Fields the two routes share."""

    model: str = Field(min_length=1, description="A served model's id (see GET /v1/models) or its MODEL_ID.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy. Default: TEMPERATURE.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling. Default: TOP_P.")
    n: int = Field(default=1, ge=1, le=64, description="Choices to generate for each prompt.")
    stop: Stop = Field(default=None, description="Up to 8 strings; generation ends before the first one.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Reproducible sampling; choice c of n samples with seed + c."
    )
    stream: bool = Field(default=False, description="Answer with server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream: true.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=1024, description="Token id (as a string) -> bias from -100 to 100 added to its logit."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object, or json_schema (constrained decoding: the answer matches it)."
    )
    # Metadata the SDK may send: accepted, not used.
    user: str | None = Field(default=None, description="End-user id; metadata, not used.")
    store: Any = Field(default=None, description="Metadata; not used (nothing is stored).")
    metadata: Any = Field(default=None, description="Metadata; not used.")
    service_tier: Any = Field(default=None, description="Metadata; not used.")
    prompt_cache_key: Any = Field(default=None, description="Metadata; not used.")
    safety_identifier: Any = Field(default=None, description="Metadata; not used.")
    # Extensions beyond OpenAI's API (as vLLM accepts them, in the SDK's extra_body).
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="Extension: top-k filter. Default: TOP_K.")
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, description="Extension: CTRL-style repetition penalty. Default: REPETITION_PENALTY."
    )
    min_p: float | None = Field(default=None, ge=0, le=1, description="Extension: drop tokens below min_p x the top.")
    min_tokens: int = Field(
        default=0,
        ge=0,
        description="Extension: no EOS, stop_token_ids or stop string ends the answer before this many tokens.",
    )
    stop_token_ids: list[int] | None = Field(
        default=None, max_length=64, description="Extension: token ids that end a choice, like EOS."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past EOS.")
    guided_json: dict[str, Any] | str | None = Field(default=None, description="Extension: a JSON schema to match.")
    guided_regex: str | None = Field(default=None, description="Extension: a regular expression to match.")
    guided_choice: list[str] | None = Field(
        default=None, min_length=1, max_length=256, description="Extension: answer one of these strings."
    )
    guided_grammar: str | None = Field(default=None, description="Extension: an EBNF grammar to match.")


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "pydoc-gpt-mini", "prompt": "Return the", "max_tokens": 16, "temperature": 0}]
        }
    )

    prompt: Text | Annotated[list[Text], Field(min_length=1)] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    max_tokens: int | None = Field(
        default=None, ge=0, description="Tokens to generate (0: none, to score the prompt). Default: MAX_NEW_TOKENS."
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Log-probabilities of the chosen token and this many alternatives."
    )
    echo: bool = Field(
        default=False, description="Put the prompt before the completion (with logprobs: the prompt's too)."
    )
    suffix: str | None = Field(default=None, description="Not supported (400).")
    best_of: int | None = Field(default=None, ge=1, description="Only best_of == n is supported.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str = Field(description="Only 'text' parts are supported.")
    text: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(default="{}", max_length=100_000, description="JSON text of the arguments.")


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(description="system, user, assistant or tool (developer is read as system).")
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="Only on tool messages: the function's name.")
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=64, description="An assistant's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the call it answers.")


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Letters, digits, _ . - (at most 64).")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionIn


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "pydoc-gpt-mini",
                    "messages": [{"role": "user", "content": "What does json.dumps do?"}],
                    "max_tokens": 32,
                    "stream": True,
                }
            ]
        }
    )

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Default: MAX_NEW_TOKENS.")
    logprobs: bool = Field(default=False, description="Return the chosen tokens' log-probabilities.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    tools: list[ToolIn] | None = Field(default=None, max_length=128, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="none, auto (the default with tools: the model's text is read by TOOL_PARSER), required (a call "
        "of one of the tools, constrained), or a named function (a call of it, constrained).",
    )
    functions: list[Any] | None = Field(default=None, description="Not supported (400 unless empty).")
    function_call: Any = Field(default=None, description="Not supported (400 unless 'none').")
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call per answer.")


# --- models and errors --------------------------------------------------------------------------


class ModelCard(BaseModel):
    """An OpenAI model object, with this service's state of the model."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    state: ModelState


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
