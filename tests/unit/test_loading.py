"""Loading on CPU through the placement path: a budget that forces offload, quantized checkpoints,
the refusals that name the method, and the report of where the weights went."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.loading import checkpoint_bytes, placement_facts, shape_bytes
from engine.model import EngineConfig, TextGenerator
from engine.placement import PlacementError
from engine.quantization import QuantizationError, check
from engine.timing import PhaseTimer
from engine.types import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def _weights(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())


@pytest.fixture(scope="module")
def plain(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="float32"))


def _with_quantization(src: Path, dst: Path, quantization_config: dict) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return dst


def test_checkpoint_size_from_its_headers(tiny_causal: Path, plain: TextGenerator) -> None:
    stored = checkpoint_bytes(str(tiny_causal), None)
    # The file stores the tied head once, as the model holds it; float32 as stored, half at bfloat16.
    assert stored == _weights(plain.model)
    assert checkpoint_bytes(str(tiny_causal), 2) == stored // 2
    assert checkpoint_bytes("org/not-downloaded", 4) is None


def test_checkpoint_size_from_the_models_shape(tiny_causal: Path, plain: TextGenerator) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(tiny_causal)
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in plain.model.buffers()}.values())
    size += _weights(plain.model)
    assert shape_bytes(GPT2LMHeadModel, config, torch.float32) == size
    assert shape_bytes(AutoModelForCausalLM, config, torch.float32) == size  # the class for remote code
    assert shape_bytes(GPT2LMHeadModel, object(), torch.float32) is None  # unknown: checked after loading


def test_a_cpu_budget_offloads_the_rest_and_answers_the_same(tiny_causal: Path, plain: TextGenerator) -> None:
    size = _weights(plain.model)
    timer = PhaseTimer()
    budget = int(size * 0.7)  # room for the embeddings and the largest layer, not for every layer
    config = EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="float32", max_memory={"cpu": budget})
    split = TextGenerator.load(config, timer)
    where = timer.facts["placement"]
    assert where["mode"] == "split" and where["offload"] == "disk"
    assert set(where["devices"]) == {"cpu", "disk"} and sum(where["devices"].values()) == size
    assert where["devices"]["cpu"] <= budget and where["dtype"] == "float32" and where["quantization"] is None
    [ids] = plain.encode(["Return the number of items"], GREEDY)
    prompts = [ids, ids[:3], ids[2:]]
    assert split.generate(prompts, GREEDY) == plain.generate(prompts, GREEDY)


def test_a_budget_too_small_for_the_first_layers_is_refused(tiny_causal: Path) -> None:
    with pytest.raises(PlacementError, match="leave its first layers on disk"):
        TextGenerator.load(EngineConfig(model_id=str(tiny_causal), max_memory={"cpu": 1000}, label="model 'tiny'"))


def test_the_plain_cpu_report(tiny_causal: Path) -> None:
    timer = PhaseTimer()
    loaded = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="float32"), timer)
    weights = _weights(loaded.model)  # before a first batch packs its layers (engine.cpu)
    assert timer.facts["placement"] == {
        "devices": {"cpu": weights},
        "dtype": "float32",
        "quantization": None,
        "mode": "single",
        "budgets_gb": {},
        "offload": None,
    }
    # Every weight's pages were mapped in the warm-up (one madvise per tensor).
    assert timer.facts["touched_bytes"] == weights and timer.facts["touch"] == "madvise"


def test_a_gpu_only_method_on_cpu_fails_naming_the_method(tiny_causal: Path, tmp_path: Path) -> None:
    model = _with_quantization(tiny_causal, tmp_path / "fp8", {"quant_method": "fp8", "weight_block_size": [128, 128]})
    timer = PhaseTimer()
    with pytest.raises(QuantizationError) as info:
        TextGenerator.load(EngineConfig(model_id=str(model), label="model 'tiny-fp8'"), timer)
    assert str(info.value).startswith("model 'tiny-fp8' is quantized with fp8, which runs on cuda only")
    assert "NUM_GPUS_PER_REPLICA > 0" in str(info.value)
    assert "warmup" not in timer.phases  # refused before any weight was read


def test_a_missing_package_fails_naming_the_method_and_the_package(tiny_causal: Path, tmp_path: Path) -> None:
    model = _with_quantization(tiny_causal, tmp_path / "gptq", {"quant_method": "gptq", "bits": 4})
    with pytest.raises(QuantizationError, match=r"quantized with gptq, which needs .*pip install"):
        TextGenerator.load(EngineConfig(model_id=str(model)))
    config = type("C", (), {"quantization_config": {"quant_method": "awq", "bits": 4}})()
    with pytest.raises(QuantizationError, match="quantized with awq, which needs gptqmodel: pip install gptqmodel"):
        check(config, "cuda", installed=lambda module: False)
    assert check(config, "cuda", installed=lambda module: True) == {"method": "awq", "bits": 4}


def test_a_torchao_int8_checkpoint_loads_through_its_own_config(tmp_path: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TorchAoConfig

    from testing.checkpoints import build_tokenizer

    # A tiny Llama (torchao quantizes nn.Linear; GPT-2's projections are Conv1D), quantized and saved.
    tok = build_tokenizer(tmp_path / "src")
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    ids = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, **ids, max_position_embeddings=128)).save_pretrained(tmp_path / "src")
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path / "src", dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    quantized.save_pretrained(tmp_path / "int8")
    tok.save_pretrained(tmp_path / "int8")

    timer = PhaseTimer()
    engine = TextGenerator.load(EngineConfig(model_id=str(tmp_path / "int8"), num_threads=1, dtype="float32"), timer)
    where = timer.facts["placement"]
    assert where["quantization"] == {"method": "torchao"}
    # The linear layers' weights in int8 (a quarter of float32), the embeddings and norms as they were.
    loaded = sum(where["devices"].values())  # parameters as stored, plus the rotary buffers the file lacks
    assert 0 <= loaded - checkpoint_bytes(str(tmp_path / "int8"), None) <= 128
    assert loaded < 0.6 * checkpoint_bytes(str(tmp_path / "src"), None)
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "int8")
    [prompt] = engine.encode(["Return the number of items"], GREEDY)
    [completion] = engine.generate([prompt], GREEDY)
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    text = engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.completion_tokens > 0 and text.startswith(completion.text)
    assert placement_facts(engine.model)["quantization"] == {"method": "torchao"}
