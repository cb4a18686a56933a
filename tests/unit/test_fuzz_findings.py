"""What schemathesis found against the live service (tests/integration/test_fuzz.py), one test each."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend


@pytest.fixture
def client(tiny_causal: Path) -> TestClient:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    return TestClient(create_app(FakeBackend(settings), settings), raise_server_exceptions=False)


def test_an_empty_prompt_list_is_a_400_not_a_500(client: TestClient) -> None:
    # `[]` matched the schema as an empty list of token ids, and building the model call failed (500).
    for stream in (False, True):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": [], "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt" and "empty" in error["message"]


def test_unknown_field_names_reach_the_log_quoted_on_one_line(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Field names are the client's text: one with a line break forged a second log line.
    caplog.set_level(logging.INFO, logger="ray.serve")
    body = {"model": "tiny", "prompt": "a", "a\nINFO forged line": 1, "\x1b[31mred": 2}
    body |= {f"extra{i}": i for i in range(20)}
    assert client.post("/v1/completions", json=body).status_code == 200
    (message,) = [r.getMessage() for r in caplog.records if "ignoring fields" in r.getMessage()]
    assert "\n" not in message and "\x1b" not in message
    assert "'a\\nINFO forged line'" in message and message.endswith("and 12 more")
