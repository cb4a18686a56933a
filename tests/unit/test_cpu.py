"""DTYPE=auto on a CPU follows its flags; the fused activation computes what GPT-2's own does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers.activations import NewGELUActivation

import engine.cpu
from engine.cpu import auto_cpu_dtype, cpu_flags, emulated_on_cpu, fuse_activations
from engine.model import EngineConfig, TextGenerator
from engine.timing import PhaseTimer
from engine.types import SamplingParams


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_tile", "amx_bf16"}, torch.bfloat16),
        ({"avx512f", "avx2"}, torch.float32),
        (set(), torch.float32),
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_has_it_natively(flags: set[str], expected: torch.dtype) -> None:
    dtype, why = auto_cpu_dtype(flags)
    assert dtype == expected and why


def test_flags_are_read_from_the_cpuinfo_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16\nbugs\t: none\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_fused_gelu_equals_gpt2s_own_up_to_rounding() -> None:
    model = torch.nn.Sequential(NewGELUActivation(), torch.nn.Sequential(NewGELUActivation()))
    x = torch.randn(4, 3072)
    expected = model(x)
    assert fuse_activations(model) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_auto_engine_reports_its_dtype_and_why(tiny_causal: Path) -> None:
    timer = PhaseTimer()
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1), timer)
    chosen, _ = auto_cpu_dtype()
    assert timer.facts["dtype_reason"].startswith("auto: ")
    # The checkpoint is float32: where auto chooses bfloat16, it still wakes in float32.
    assert engine.model.dtype == torch.float32
    assert timer.facts["placement"]["dtype"] == "float32"
    if chosen == torch.bfloat16:
        assert timer.facts["placement"]["dtype_after_first_answer"] == "bfloat16"
        engine.generate(engine.encode(["Hello"], SamplingParams(max_new_tokens=2)), SamplingParams(max_new_tokens=2))
        assert engine.model.dtype == torch.bfloat16
    else:
        assert "dtype_after_first_answer" not in timer.facts["placement"]


@pytest.mark.parametrize(
    ("dtype", "flags", "emulated"),
    [
        (torch.bfloat16, {"avx2"}, True),
        (torch.bfloat16, {"avx512f", "avx512_bf16"}, False),
        (torch.bfloat16, {"amx_bf16"}, False),
        (torch.float16, {"avx512_bf16"}, True),
        (torch.float16, {"avx512_fp16"}, False),
        (torch.float32, set(), False),
    ],
)
def test_a_half_dtype_without_its_cpu_instructions_is_called_emulated(
    dtype: torch.dtype, flags: set[str], emulated: bool
) -> None:
    why = emulated_on_cpu(dtype, flags)
    assert (why is not None) == emulated
    if emulated:
        assert str(dtype).removeprefix("torch.") in why and "slower than float32" in why


def test_an_explicit_dtype_the_cpu_emulates_says_so_in_the_report_and_the_log(
    tiny_causal: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine.cpu, "cpu_flags", lambda: {"avx2"})  # a CPU without native bfloat16
    timer = PhaseTimer()
    with caplog.at_level(logging.WARNING, logger="engine.model"):
        loaded = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="bfloat16"), timer)
    assert loaded.model.dtype == torch.bfloat16  # as set: a warning, not a refusal
    assert timer.facts["dtype_reason"].startswith("DTYPE; this cpu lists no native bfloat16")
    assert any("DTYPE=bfloat16, but" in r.getMessage() and "auto would load float32" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    monkeypatch.setattr(engine.cpu, "cpu_flags", lambda: {"avx512_bf16"})
    assert EngineConfig(model_id="x", dtype="bfloat16").dtype_choice() == (torch.bfloat16, "DTYPE")
    assert EngineConfig(model_id="x", dtype="float32").dtype_choice() == (torch.float32, "DTYPE")
