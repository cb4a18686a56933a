"""Shared fixtures: tiny random checkpoints built once per session (no hub, no network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal, build_tiny_encoder, build_tiny_seq2seq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent
# The longest modules, longest first (1.5 to 3.5 minutes each in a whole run on two cores): the two pytest-xdist
# workers take modules in collection order, and one of these taken last would run on while the other worker idles.
# Every other module keeps pytest's order after them (integration, then the short unit modules, which fill the end).
LONGEST_FIRST = (
    "integration/test_page.py",
    "integration/test_warm_pool.py",
    "integration/test_pool.py",
    "integration/test_isolation.py",
    "integration/test_fuzz.py",
    "integration/test_faults.py",
    "integration/test_durable_state.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def order(item: pytest.Item) -> int:
        path = Path(str(item.fspath))
        return rank.get(path.relative_to(TESTS).as_posix(), len(rank)) if path.is_relative_to(TESTS) else len(rank)

    items.sort(key=order)  # stable: pytest's order within each module and among the rest


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a chat template and room for long answers (a context of 1100 tokens)."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-chat"), chat_template=CHAT_TEMPLATE, n_positions=1100)


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder whose sentence-transformers config declares cls pooling."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"), pooling="cls")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own status once everything is reported, without the interpreter's teardown.

    A whole run leaves native threads behind (Ray's driver, torch's and the grammar library's pools); once, after a
    run whose every test had passed and whose summary was printed, one of them crashed the exiting interpreter
    (SIGSEGV, exit status 139, the instruction pointer in unmapped code), which would fail a green run. Nothing is
    left to do at that point but flush and exit. The crash's owner is not identified yet.
    """
    status = getattr(config, "_run_status", None)
    if status is None or os.environ.get("PYTEST_NORMAL_EXIT"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._run_status = exitstatus  # read by pytest_unconfigure above
