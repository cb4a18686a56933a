"""Embeddings on real Ray Serve: an encoder beside a text model, reached with the official `openai` SDK and
LangChain's ``OpenAIEmbeddings``; the vectors equal the model's own (cls pooling, as its sentence-transformers
config declares) to 1e-5; it wakes from zero and goes back; each model refuses the other task's routes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from langchain_openai import OpenAIEmbeddings
from ray import serve
from transformers import AutoModel, AutoTokenizer

from ray_serve_app import build_graph
from settings import build_settings
from testing.polling import wait_for
from tests.integration.conftest import APP

KEY = "sk-embeddings-test-0123"
IDLE_TIMEOUT_S = 4.0
TEXTS = ["The socket module provides access to the BSD socket interface.", "hello", "Return the number of items."]


@pytest.fixture(scope="module")
def url(serve_port: int, tiny_encoder: Path, tiny_causal: Path) -> str:
    models = [
        {"name": "enc", "model_id": str(tiny_encoder), "task": "embed", "dtype": "float32", "max_batch_size": 8},
        {"name": "gen", "model_id": str(tiny_causal)},
    ]
    settings = build_settings(
        {
            "MODELS": json.dumps(models),
            "API_KEY": KEY,
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
            "AUTOSCALING_LOOK_BACK_S": "1",
            "METRICS_PUSH_INTERVAL_S": "0.5",
            "WARM_WORKERS": "0",
        }
    )
    serve.run(build_graph(settings), name=APP, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{serve_port}"
    wait_for(lambda: _states(base) is not None, 120, what="the gateway")
    return base


def _states(base: str) -> dict[str, str] | None:
    try:
        response = httpx.get(f"{base}/healthz", timeout=5)
    except httpx.HTTPError:
        return None
    return {m["id"]: m["state"] for m in response.json()["models"]} if response.status_code == 200 else None


@pytest.fixture(scope="module")
def expected(tiny_encoder: Path) -> list[list[float]]:
    """The model's own vectors: each text alone, cls pooling, L2-normalised."""
    model, tok = AutoModel.from_pretrained(tiny_encoder).eval(), AutoTokenizer.from_pretrained(tiny_encoder)
    with torch.inference_mode():
        vectors = [model(**tok(text, return_tensors="pt")).last_hidden_state[0, 0] for text in TEXTS]
    return [(v / v.norm()).tolist() for v in vectors]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def close(got: list[float], want: list[float]) -> bool:
    return torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_sdk_wakes_the_encoder_from_zero_and_gets_the_models_vectors(url: str, expected) -> None:
    assert _states(url)["enc"] == "scaled_to_zero"
    cards = {m.id: m for m in client(url).models.list().data}
    assert cards["enc"].model_extra["task"] == "embed" and cards["gen"].model_extra["task"] == "generate"
    answer = client(url).embeddings.create(model="enc", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert all(close(d.embedding, want) for d, want in zip(answer.data, expected, strict=True))
    assert answer.usage.prompt_tokens > len(TEXTS)
    floats = client(url).embeddings.create(model="enc", input=TEXTS[0], encoding_format="float", dimensions=16)
    cut = torch.tensor(expected[0][:16])
    assert close(floats.data[0].embedding, (cut / cut.norm()).tolist())


def test_concurrent_requests_all_get_their_own_vectors(url: str, expected) -> None:
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as aio:
            calls = [aio.embeddings.create(model="enc", input=TEXTS[i % 3]) for i in range(12)]
            return await asyncio.gather(*calls)

    for i, answer in enumerate(asyncio.run(run())):
        assert close(answer.data[0].embedding, expected[i % 3])


def test_langchain_embeddings(url: str, expected) -> None:
    # LangChain tokenises with tiktoken by default (OpenAI's vocabulary, downloaded on first use): token ids
    # meaningless to another model. Raw text is what a self-hosted model needs.
    embeddings = OpenAIEmbeddings(
        model="enc", base_url=f"{url}/v1", api_key=KEY, check_embedding_ctx_length=False, max_retries=0
    )
    documents = embeddings.embed_documents(TEXTS)
    assert all(close(got, want) for got, want in zip(documents, expected, strict=True))
    assert close(embeddings.embed_query(TEXTS[1]), expected[1])


def test_each_model_refuses_the_other_tasks_routes(url: str) -> None:
    with pytest.raises(openai.BadRequestError, match=r"embedding model.*/v1/embeddings"):
        client(url).chat.completions.create(model="enc", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"text generation model.*/v1/completions"):
        client(url).embeddings.create(model="gen", input="hi")
    with pytest.raises(openai.BadRequestError, match="dimensions 64 is above this model's 32"):
        client(url).embeddings.create(model="enc", input="hi", dimensions=64)
    assert _states(url)["gen"] == "scaled_to_zero"  # refused at the Gateway: the text model never woke


def test_the_encoder_scales_back_to_zero(url: str) -> None:
    wait_for(lambda: _states(url)["enc"] == "scaled_to_zero", 60, what="the encoder at zero replicas")
