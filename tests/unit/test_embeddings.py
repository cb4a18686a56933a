"""Embeddings: pooling as the checkpoint declares it, normalisation, the dialect's input forms and encodings,
``dimensions``, the TASK setting, and the routes each task serves (HTTP with a real encoder, no Ray)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModel, AutoTokenizer

from config.errors import SettingsError
from engine.embeddings import Embedder, EmbedderConfig, EmbeddingBatcher, declared_pooling, normalise, pool
from serving.api.openai_embeddings import encode_base64
from serving.app import create_app
from serving.model_server import ModelServer
from settings import build_settings
from testing.checkpoints import build_tiny_encoder
from tests.fakes import FakeBackend


def direct(path: Path, texts: list[str], mode: str) -> list[torch.Tensor]:
    """The model's own vectors, one text at a time (no padding), pooled by hand and normalised."""
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    out = []
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
            vector = hidden[0] if mode == "cls" else hidden.mean(0)
            out.append(vector / vector.norm())
    return out


def test_pooling_read_from_sentence_transformers_config(tmp_path: Path) -> None:
    assert declared_pooling(str(build_tiny_encoder(tmp_path / "cls", pooling="cls"))) == "cls"
    assert declared_pooling(str(build_tiny_encoder(tmp_path / "mean", pooling="mean"))) == "mean"
    assert declared_pooling(str(build_tiny_encoder(tmp_path / "last", pooling="lasttoken"))) == "lasttoken"
    assert declared_pooling(str(build_tiny_encoder(tmp_path / "none"))) == "mean"  # no modules.json
    with pytest.raises(ValueError, match="max"):
        declared_pooling(str(build_tiny_encoder(tmp_path / "max", pooling="max")))


def test_pool_leaves_padding_out() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 1.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, "lasttoken").tolist() == [[3.0, 2.0]]


def test_normalise_and_dimensions() -> None:
    vectors = normalise(torch.tensor([[3.0, 4.0, 12.0]]))
    assert torch.allclose(vectors, torch.tensor([[3 / 13, 4 / 13, 12 / 13]]))
    cut = normalise(torch.tensor([[3.0, 4.0, 12.0]]), dimensions=2)
    assert torch.allclose(cut, torch.tensor([[0.6, 0.8]]))


def test_base64_is_little_endian_float32() -> None:
    vector = [0.25, -1.5, 3.0]
    raw = base64.b64decode(encode_base64(vector))
    assert struct.unpack("<3f", raw) == (0.25, -1.5, 3.0)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_embedder_matches_the_model_in_a_padded_batch(tmp_path: Path, mode: str) -> None:
    path = build_tiny_encoder(tmp_path / mode, pooling=mode)
    embedder = Embedder.load(EmbedderConfig(model_id=str(path), dtype="float32"))
    texts = ["a short one", "a much longer sentence about the socket module and its interface"]
    got = embedder.embed(embedder.encode_texts(texts))  # padded together in one pass
    for vector, expected in zip(got, direct(path, texts, mode), strict=True):
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-5)


def test_task_setting_is_validated_naming_the_variable(tiny_encoder: Path) -> None:
    with pytest.raises(SettingsError, match="TASK: input should be 'generate' or 'embed', got 'classify'"):
        build_settings({"MODEL_ID": str(tiny_encoder), "TASK": "classify"})
    entries = json.dumps([{"name": "e", "model_id": str(tiny_encoder), "task": "rank"}])
    with pytest.raises(SettingsError, match=r"MODELS.*task.*'rank'"):
        build_settings({"MODELS": entries})
    settings = build_settings({"MODELS": json.dumps([{"name": "e", "model_id": str(tiny_encoder), "task": "embed"}])})
    assert settings.model_configs[0].task == "embed"


@pytest.fixture(scope="module")
def service(tiny_encoder: Path, tiny_causal: Path):
    entries = [
        {"name": "enc", "model_id": str(tiny_encoder), "task": "embed", "dtype": "float32", "max_batch_size": 4},
        {"name": "gen", "model_id": str(tiny_causal)},
    ]
    settings = build_settings({"MODELS": json.dumps(entries), "REQUEST_TIMEOUT_S": "10"})
    backend = FakeBackend(settings)
    backend.servers["enc"] = ModelServer.func_or_class(settings.model_configs[0])  # the real encoder, no Ray
    return TestClient(create_app(backend, settings), raise_server_exceptions=False), tiny_encoder


def embed(client: TestClient, **body) -> tuple[int, dict]:
    response = client.post("/v1/embeddings", json={"model": "enc", **body})
    return response.status_code, response.json()


def test_input_forms_give_the_models_vectors(service) -> None:
    client, path = service
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["hello world", "the socket module"]
    expected = direct(path, texts, "cls")
    status, one = embed(client, input=texts[0])
    assert status == 200 and one["object"] == "list" and one["model"] == "enc"
    assert torch.allclose(torch.tensor(one["data"][0]["embedding"]), expected[0], atol=1e-5)
    tokens = len(tok(texts[0])["input_ids"])
    assert one["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    status, many = embed(client, input=texts)
    assert [d["index"] for d in many["data"]] == [0, 1]
    ids = [tok(t)["input_ids"] for t in texts]
    status_ids, by_ids = embed(client, input=ids)
    status_one_id, by_one_id = embed(client, input=ids[1])
    assert status_ids == status_one_id == 200
    for i in range(2):
        assert torch.allclose(torch.tensor(many["data"][i]["embedding"]), expected[i], atol=1e-5)
        assert torch.allclose(torch.tensor(by_ids["data"][i]["embedding"]), expected[i], atol=1e-5)
    assert torch.allclose(torch.tensor(by_one_id["data"][0]["embedding"]), expected[1], atol=1e-5)
    assert many["usage"]["prompt_tokens"] == by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_base64_and_dimensions(service) -> None:
    client, _ = service
    _, floats = embed(client, input="hello world")
    _, packed = embed(client, input="hello world", encoding_format="base64")
    decoded = struct.unpack("<32f", base64.b64decode(packed["data"][0]["embedding"]))
    assert torch.allclose(torch.tensor(decoded), torch.tensor(floats["data"][0]["embedding"]), atol=1e-7)
    status, cut = embed(client, input="hello world", dimensions=8)
    vector = torch.tensor(cut["data"][0]["embedding"])
    assert status == 200 and len(vector) == 8 and abs(vector.norm().item() - 1) < 1e-6
    whole = torch.tensor(floats["data"][0]["embedding"])
    assert torch.allclose(vector, torch.nn.functional.normalize(whole[:8], dim=0))
    status, error = embed(client, input="hello world", dimensions=33)
    assert status == 400 and error["error"]["param"] == "dimensions" and "32" in error["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "empty"),
        ({"input": ["a", ""]}, "input", "empty"),
        ({"input": "word " * 200}, "input", "over this model's limit of 128"),
        ({"input": [[1, 2], [10**6]]}, "input", "outside the vocabulary"),
        ({"input": [1.5]}, "input", ""),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", ""),
    ],
)
def test_bad_inputs_are_400s(service, body: dict, param: str, words: str) -> None:
    client, _ = service
    status, error = embed(client, **body)
    assert status == 400, error
    assert (error["error"]["param"] or "").startswith(param) and words in error["error"]["message"]


def test_each_task_is_served_by_its_own_routes(service) -> None:
    client, _ = service
    response = client.post("/v1/completions", json={"model": "enc", "prompt": "hi"})
    assert response.status_code == 400
    assert "embedding model" in response.json()["error"]["message"]
    assert "/v1/embeddings" in response.json()["error"]["message"]
    for route, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/generate", {"prompt": "hi"})]:  # fmt: skip
        assert client.post(route, json={"model": "enc", **body}).status_code == 400
    status, error = embed(client, model="gen", input="hi")
    assert status == 400 and error["error"]["code"] == "wrong_task"
    assert "/v1/completions" in error["error"]["message"] and "/v1/chat/completions" in error["error"]["message"]
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["enc"]["task"] == "embed" and cards["gen"]["task"] == "generate"
    assert cards["enc"]["routes"] == ["/v1/embeddings"]


def test_batcher_shares_passes_between_requests_within_its_bound() -> None:
    passes: list[int] = []

    def fake_embed(batch, dimensions):  # each input's vector is its first token id
        passes.append(len(batch))
        return [[float(ids[0])] for ids in batch]

    async def run() -> list:
        batcher = EmbeddingBatcher(fake_embed, max_batch_size=4)
        return await asyncio.gather(*(batcher.embed([[i], [i + 100]], None) for i in range(5)))

    answers = asyncio.run(run())
    assert answers == [[[float(i)], [float(i + 100)]] for i in range(5)]
    assert sum(passes) == 10 and max(passes) == 4 and len(passes) == 3  # 10 inputs, at most 4 a pass


def test_a_failed_pass_fails_its_requests_only() -> None:
    def fake_embed(batch, dimensions):
        if any(ids[0] == 13 for ids in batch):
            raise RuntimeError("bad pass")
        return [[1.0] for _ in batch]

    async def run() -> tuple:
        batcher = EmbeddingBatcher(fake_embed, max_batch_size=1)
        return await asyncio.gather(batcher.embed([[13]], None), batcher.embed([[1]], None), return_exceptions=True)

    failed, fine = asyncio.run(run())
    assert isinstance(failed, RuntimeError) and fine == [[1.0]]
