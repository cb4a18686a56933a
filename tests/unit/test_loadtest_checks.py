"""The load test's answer checks: a wrong body is a failure; the request mix is valid for the service."""

from __future__ import annotations

import copy
import random

import pytest

from loadtest.checks import problems, request_mix
from serving.api.native_schemas import GenerateRequest
from settings import DEFAULT_MODEL_DIR, REPO_ROOT
from tests.docs import code_lines, section

SENT = {"prompts": ["Return the", "Raise"], "generation_kwargs": {"max_new_tokens": 8, "seed": 3, "stop": ["."]}}
GOOD = {
    "model": "m",
    "prompts": ["Return the", "Raise"],
    "completions": [" value", " an error"],
    "finish_reasons": ["stop", "length"],
    "generation_kwargs": {"max_new_tokens": 8, "temperature": 0.7, "seed": 3, "stop": ["."]},
    "usage": {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13},
}


def test_a_well_formed_answer_has_no_problems() -> None:
    assert problems(GOOD, SENT) == []
    usage = {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    single = {**GOOD, "prompts": ["Return the"], "completions": ["x"], "finish_reasons": ["stop"], "usage": usage}
    assert problems(single, {"prompt": "Return the"}) == []


def _broken(path: tuple, value: object) -> dict:
    body = copy.deepcopy(GOOD)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (["not", "an", "object"], "not a JSON object"),
        ({"error": {"code": 500}}, "keys"),
        ({**GOOD, "extra": 1}, "keys"),
        (_broken(("prompts",), ["other", "Raise"]), "prompts do not echo"),
        (_broken(("completions",), [" value"]), "1 completions for 2 prompts"),
        (_broken(("completions",), [" value", None]), "not a string"),
        (_broken(("finish_reasons",), ["stop", "eos"]), "finish_reasons"),
        (_broken(("usage", "total_tokens"), 12), "total_tokens"),
        (_broken(("usage", "completion_tokens"), 17), "above max_new_tokens"),
        (_broken(("usage",), None), "integer token counts"),
        (_broken(("generation_kwargs", "seed"), 4), "generation_kwargs.seed"),
        (_broken(("generation_kwargs", "stop"), []), "generation_kwargs.stop"),
    ],
)
def test_a_wrong_answer_is_a_failure(body: object, fragment: str) -> None:
    found = problems(body, SENT)
    assert found and any(fragment in p for p in found), found


def test_the_request_mix_is_valid_and_fits_the_embedded_model() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    rng = random.Random(0)
    names = set()
    for _ in range(300):
        name, body = request_mix(rng)
        names.add(name)
        request = GenerateRequest.model_validate(body)
        max_new = request.generation_kwargs.max_new_tokens or 256  # the service default
        for prompt in request.prompt_list():
            assert len(tokenizer(prompt)["input_ids"]) + max_new <= tokenizer.model_max_length
    assert names == {"single short", "single long", "batch", "single stop", "single defaults"}


def _table(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_the_docs_quote_the_committed_run_and_its_command() -> None:
    """The README's Load tests section links the run kept in loadtest/results/summary.md, a run without failures."""
    document, text = section("Load tests")
    committed = _table((REPO_ROOT / "loadtest" / "results" / "summary.md").read_text())
    assert "(loadtest/results/summary.md)" in text, f"{document.name} (Load tests) does not link summary.md"
    assert committed, "summary.md has no table"
    total = committed[-1].split("|")
    assert total[1].strip() == "Aggregated" and int(total[2]) > 0 and int(total[3]) == 0
    assert any("[cold start] |" in row for row in committed), "the run did not start at zero replicas"
    assert "locust --config loadtest/locust.conf --cold-start" in code_lines(text)
