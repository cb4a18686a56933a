"""The OpenAI embeddings dialect: ``POST /v1/embeddings`` request, translation and response.

``input`` is a string, a list of strings, a list of token ids or a list of such lists (as OpenAI's API
and the clients that tokenise first send it); ``encoding_format`` ``float`` or ``base64`` (the bytes of
little-endian float32, as OpenAI sends them and the ``openai`` SDK decodes by default); ``dimensions``
cuts each vector to that size and renormalises it (a 400 above the model's hidden size, from the replica).
"""

from __future__ import annotations

import base64
import logging
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from serving.api.openai_schemas import _Request
from settings import ModelConfig

logger = logging.getLogger("ray.serve")

MAX_INPUTS = 2048  # OpenAI's own limit on the number of inputs in one request
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]
Input = str | Annotated[list[str], Field(max_length=MAX_INPUTS)] | TokenIds
Inputs = Input | Annotated[list[TokenIds], Field(max_length=MAX_INPUTS)]


class EmbeddingsRequest(_Request):
    """``POST /v1/embeddings`` (OpenAI's shape). Unknown fields are accepted and logged."""

    model: str = Field(min_length=1, description="A served embedding model's id (see GET /v1/models) or MODEL_ID.")
    input: Inputs = Field(description="A string, a list of strings, a list of token ids, or a list of such lists.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Cut each vector to this size (renormalised).")
    user: str | None = Field(default=None, description="End-user id; metadata, not used.")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Inputs) -> Inputs:
        if value == "" or value == [] or (isinstance(value, list) and any(x == "" or x == [] for x in value)):
            raise ValueError("must not be empty (nor hold an empty string or an empty list of token ids)")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def translate(body: EmbeddingsRequest, request_id: str) -> EmbeddingRequest:
    """The engine's request: texts, or token-id lists, in the order given."""
    if unknown := body.unknown_fields():
        logger.info("request %s: ignoring fields this API does not define: %s", request_id, ascii(unknown[:8]))
    value = body.input
    if isinstance(value, str):
        return EmbeddingRequest(texts=(value,), dimensions=body.dimensions, request_id=request_id)
    if value and isinstance(value[0], int):
        return EmbeddingRequest(token_inputs=(tuple(value),), dimensions=body.dimensions, request_id=request_id)  # type: ignore[arg-type]
    if value and isinstance(value[0], list):
        rows = tuple(tuple(ids) for ids in value)  # type: ignore[union-attr]
        return EmbeddingRequest(token_inputs=rows, dimensions=body.dimensions, request_id=request_id)
    return EmbeddingRequest(texts=tuple(value), dimensions=body.dimensions, request_id=request_id)  # type: ignore[arg-type]


def encode_base64(vector: list[float]) -> str:
    """OpenAI's ``base64`` encoding: the vector as little-endian float32 bytes.

    >>> encode_base64([1.0, -0.5])
    'AACAPwAAAL8='
    """
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def response(body: EmbeddingsRequest, model: ModelConfig, result: EmbeddingResult) -> EmbeddingsResponse:
    encode = encode_base64 if body.encoding_format == "base64" else (lambda v: v)
    data = [Embedding(index=i, embedding=encode(v)) for i, v in enumerate(result.vectors)]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingsResponse(data=data, model=model.name, usage=usage)
