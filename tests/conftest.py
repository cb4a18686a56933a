"""Shared fixtures: tiny random checkpoints built once per session (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal, build_tiny_encoder, build_tiny_seq2seq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
