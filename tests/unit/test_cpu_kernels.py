"""The bfloat16 CPU fast paths compute what the model's own layers do: prepacked linears and decode attention."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.pytorch_utils import Conv1D

import engine.cpu as engine_cpu
import engine.model as engine_model
from engine.attention import NAME, PRODUCTS_NAME, decode_attention, packed_attention
from engine.continuous import ContinuousBatch
from engine.cpu import NATIVE_BF16_FLAGS, PackedLinear, cpu_flags, pack_linears, prepare_cpu_model, transposed
from engine.model import EngineConfig, TextGenerator
from engine.timing import PhaseTimer
from engine.types import Delta, SamplingParams
from engine.work import WorkItem
from testing.checkpoints import build_tiny_llama

native_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and cpu_flags() & set(NATIVE_BF16_FLAGS)),
    reason="this CPU has no native bfloat16: the engine keeps the plain layers here",
)


@native_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear_and_conv1d_in_bfloat16(bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    conv = Conv1D(40, 96).to(torch.bfloat16)  # GPT-2's layer: weight [in, out]
    model = torch.nn.ModuleDict({"linear": linear, "conv": conv})
    inputs = [torch.randn(5, 96), torch.randn(3, 1, 96), torch.randn(2, 7, 192)[..., ::2]]  # the last one strided
    inputs = [x.to(torch.bfloat16) for x in inputs]
    expected = {name: [module(x) for x in inputs] for name, module in model.items()}
    if not bias:
        conv.bias = None  # Conv1D always has one; drop it to check the bias-free path as well
        expected["conv"] = [x @ conv.weight for x in inputs]
    model.get_input_embeddings = lambda: None  # what pack_linears asks of a model
    assert pack_linears(model, rows_hint=16) == {"packed_linears": 2, "packed_extra_bytes": 0, "folded_activations": 0}
    assert all(type(module) is PackedLinear for module in model.values())
    for name, module in model.items():
        for x, want in zip(inputs, expected[name], strict=True):
            assert torch.equal(module(x), want), name


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=native_bf16)])
def test_a_gpt2_mlps_gelu_is_folded_into_its_packed_input_layer(dtype: torch.dtype, tiny_causal: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_causal, dtype=dtype).eval()
    x = torch.randn(2, 5, model.config.n_embd).to(dtype)
    mlps = [block.mlp for block in model.transformer.h]
    with torch.inference_mode():
        engine_cpu.fuse_activations(model)
        expected = [mlp(x) for mlp in mlps]
        facts = pack_linears(model, rows_hint=4)
        assert facts["folded_activations"] == len(mlps)
        for mlp, want in zip(mlps, expected, strict=True):
            assert type(mlp.act) is torch.nn.Identity
            assert mlp.c_fc.activation == ("gelu", "tanh")
            # GELU applied to the float32 sums before rounding: bfloat16 answers round once, not twice.
            tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
            torch.testing.assert_close(mlp(x), want, **tolerance)
        assert pack_linears(model, rows_hint=4)["folded_activations"] == 0  # nothing left to fold


def test_only_a_gelu_onednn_computes_alike_is_folded() -> None:
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

    assert engine_cpu._onednn_activation(GELUTanh()) == ("gelu", "tanh")
    assert engine_cpu._onednn_activation(GELUActivation()) == ("gelu", "none")
    for other in (GELUTanh(use_gelu_tanh_python=True), GELUActivation(use_gelu_python=True), NewGELUActivation()):
        assert engine_cpu._onednn_activation(other) is None


def _attention_inputs(rows: int, heads: int, kv_heads: int, width: int, whole: bool = False):
    torch.manual_seed(1)
    # The cache's buffers are longer than the step reads, as the slot cache's, unless the step reads them whole.
    capacity, dim = width if whole else width + 13, 16
    keys = torch.randn(rows + 2, kv_heads, capacity, dim, dtype=torch.bfloat16)[:rows, :, :width]
    values = torch.randn(rows + 2, kv_heads, capacity, dim, dtype=torch.bfloat16)[:rows, :, :width]
    query = torch.randn(rows, heads, 1, dim, dtype=torch.bfloat16)
    lengths = torch.tensor([width, 1, width // 2, 3][:rows])
    mask = (torch.arange(width)[None, :] < lengths[:, None])[:, None, None, :]
    return query, keys, values, mask


@pytest.mark.parametrize("whole", [False, True], ids=["strided", "whole"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_decode_attention_equals_attention_computed_in_float32(heads: int, kv_heads: int, whole: bool) -> None:
    query, keys, values, mask = _attention_inputs(rows=4, heads=heads, kv_heads=kv_heads, width=37, whole=whole)
    assert keys.flatten(0, 1).is_contiguous() == whole  # whole: the products take the buffers without a copy
    module = torch.nn.Module()
    out, weights = decode_attention(module, query, keys, values, mask, scaling=0.3)
    assert weights is None and out.shape == (4, 1, heads, 16)
    group = heads // kv_heads
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = (query.float() @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    want = (scores.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    # A row's answer does not depend on the rows beside it.
    alone, _ = decode_attention(module, query[1:2], keys[1:2], values[1:2], mask[1:2], scaling=0.3)
    assert torch.equal(alone, out[1:2])


def test_everything_but_a_bfloat16_cpu_decode_step_is_sdpa() -> None:
    module = torch.nn.Module()
    query, keys, values, mask = _attention_inputs(rows=2, heads=4, kv_heads=4, width=9)
    prefill = torch.randn(2, 4, 3, 16, dtype=torch.bfloat16)
    cases = [
        (prefill, keys, values, None),  # several queries (prefill)
        (query, keys, values, None),  # no mask
        (query.float(), keys.float(), values.float(), mask),  # float32
    ]
    for q, k, v, m in cases:
        out, _ = decode_attention(module, q, k, v, m, scaling=0.25)
        expected, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.25)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_a_packed_prefill_attends_each_prompt_exactly_as_alone(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    lengths = [5, 5, 5, 3, 7, 7, 1]  # runs of equal lengths go to SDPA as one batch
    bounds = torch.tensor([0, *itertools.accumulate(lengths)])
    torch.manual_seed(4)
    tokens = sum(lengths)
    # [1, heads, tokens, dim] views of [1, tokens, heads, dim], as the model's attention hands them over
    query = torch.randn(1, tokens, heads, 16, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(1, tokens, kv_heads, 16, dtype=dtype).transpose(1, 2) for _ in range(2))
    out, _ = packed_attention(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds)
    assert out.shape == (1, tokens, heads, 16)
    for a, b in itertools.pairwise(bounds.tolist()):
        alone, _ = sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling=0.25, is_causal=True
        )
        assert torch.equal(out[:, a:b], alone), (a, b)


def test_with_amx_a_decode_step_is_sdpas_on_the_caches_strided_views() -> None:
    module = torch.nn.Module()
    query, keys, values, mask = _attention_inputs(rows=4, heads=4, kv_heads=4, width=37)
    assert not keys.is_contiguous()  # views of longer buffers, as the slot cache gives them
    out, weights = packed_attention(module, query, keys, values, mask, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)
    assert weights is None and torch.equal(out, expected)
    products, _ = decode_attention(module, query, keys, values, mask, scaling=0.3)
    torch.testing.assert_close(out.float(), products.float(), atol=2e-2, rtol=2e-2)  # the same attention


def _amx(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    """Make the engine see this CPU with (or without) AMX: which decode attention it picks, nothing else."""
    flags = cpu_flags()
    if not flags & set(NATIVE_BF16_FLAGS):
        return  # (an AMX flag here would make the engine pack bfloat16 layers a CPU computes by emulation)
    flags = flags | {"amx_bf16"} if amx else flags - {"amx_bf16"}
    monkeypatch.setattr(engine_cpu, "cpu_flags", lambda: flags)


@native_bf16
@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bfloat16_engine_answers_as_the_models_own_generate(
    kind: str, amx: bool, tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_causal if kind == "gpt2" else build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    _amx(monkeypatch, amx)
    # (Layers moved onto huge pages after the first answer compute the same: tests/unit/test_hugepages.py.)
    config = EngineConfig(model_id=str(path), dtype="bfloat16", num_threads=1, huge_pages=False)
    engine = TextGenerator.load(config)
    assert engine.model.config._attn_implementation == (NAME if amx else PRODUCTS_NAME)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    prompts = ["def add(a, b):", "import os", "Return the number of"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    ids = engine.encode(prompts, params)
    # Packed at load (plain bfloat16 layers are slow at few rows): the plain reference below
    # is what the packed layers must compute.
    assert not any(type(m) in (torch.nn.Linear, Conv1D) for m in engine.model.modules())
    assert engine.after_first_answer is None
    answers = engine.generate(ids, params)  # the three rows decode in one batch
    for prompt_ids, answer in zip(ids, answers, strict=True):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([prompt_ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        assert answer.text == tokenizer.decode(out[0, len(prompt_ids) :]), prompt_ids


@native_bf16
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_auto_wakes_a_float32_checkpoint_in_float32_and_then_runs_in_bfloat16(
    kind: str, tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_causal if kind == "gpt2" else build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    monkeypatch.setattr(engine_model, "auto_cpu_dtype", lambda: (torch.bfloat16, "cpu has amx_bf16"))
    timer = PhaseTimer()
    engine = TextGenerator.load(EngineConfig(model_id=str(path), dtype="auto", num_threads=1), timer)
    assert engine.model.dtype == torch.float32 and engine.after_first_answer is not None
    assert "float32 until the first answer ends, then bfloat16" in timer.facts["dtype_reason"]
    as_float32 = TextGenerator.load(EngineConfig(model_id=str(path), dtype="float32", num_threads=1))
    as_bfloat16 = TextGenerator.load(EngineConfig(model_id=str(path), dtype="bfloat16", num_threads=1))
    short = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True)
    ids = engine.encode(["def add(a, b):", "import os"], long)
    # Two rows in one batch: the short one's answer ends the float32 phase while the long one runs on.
    first = engine.generate(ids, [short, long])
    assert first[0] == as_float32.generate(ids[:1], short)[0]
    assert first[1].completion_tokens == 14 and first[1].finish_reason == "length"
    assert engine.model.dtype == torch.bfloat16 and engine.after_first_answer is None
    assert not any(type(m) in (torch.nn.Linear, Conv1D) for m in engine.model.modules())  # packed
    assert all(layer.keys.dtype == torch.bfloat16 for layer in engine.slots.slot_layers)  # its cache followed
    assert engine.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert engine.generate(ids, long) == as_bfloat16.generate(ids, long)  # as if loaded in bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (64, 64), (65, 130), (200, 3), (3, 200)])
def test_transposed_copies_the_matrix_transposed(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    matrix = torch.randn(shape).to(dtype)
    out = transposed(matrix, block=64)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, matrix.t())


def test_a_float32_model_is_packed_after_its_first_batch_and_answers_alike(tiny_causal: Path) -> None:
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), dtype="float32", num_threads=1))
    # Its steps are SDPA's whichever the CPU (the products are bfloat16's), its prefill prompt by prompt.
    assert engine.model.config._attn_implementation in (NAME, PRODUCTS_NAME)
    assert not any(type(m) is PackedLinear for m in engine.model.modules())
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    ids = engine.encode(["def add(a, b):", "import os"], params)
    first = engine.generate(ids, params)
    assert any(type(m) is PackedLinear for m in engine.model.modules())
    assert engine.generate(ids, params) == first
    assert prepare_cpu_model(engine.model, split=True, rows_hint=4) == ({}, None)  # an offloaded model is left alone


@pytest.mark.parametrize(("dtype", "amx"), [("bfloat16", True), ("bfloat16", False), ("float32", True)])
def test_a_rows_answer_does_not_depend_on_the_prompts_packed_beside_it(
    dtype: str, amx: bool, tiny_causal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _amx(monkeypatch, amx)
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), dtype=dtype, num_threads=1))
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    other = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    ids = engine.encode(["Return the number of", "The socket module provides"], greedy)
    long = engine.encode(["x" * 50], other)[0]
    alone = [engine.generate([i], greedy)[0] for i in ids]
    # Prefilled in one packed pass with a long prompt after and before them, then decoded together.
    together = engine.generate([ids[0], long, ids[1], long], [greedy, other, greedy, other])
    assert [together[0], together[2]] == alone


@pytest.mark.parametrize(("dtype", "amx"), [("bfloat16", True), ("bfloat16", False), ("float32", True)])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rows_that_join_a_step_answer_as_alone(
    kind: str, dtype: str, amx: bool, tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if dtype == "bfloat16" and not cpu_flags() & set(NATIVE_BF16_FLAGS):
        pytest.skip("this CPU has no native bfloat16")
    path = tiny_causal if kind == "gpt2" else build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    _amx(monkeypatch, amx)
    engine = TextGenerator.load(EngineConfig(model_id=str(path), dtype=dtype, num_threads=1))
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    ids = engine.encode(["Return the number of", "import os", "def add(a, b):", "The socket"], greedy)
    engine.generate(ids[:1], greedy)  # a float32 model packs after its first answer: compare packed with packed
    alone = [engine.generate([i], greedy)[0].text for i in ids]
    items = [WorkItem(stream=i, row=0, prompt_ids=list(p), params=greedy) for i, p in enumerate(ids)]
    arrivals = [[], [items[1]], [items[2], items[3]]]  # one during the first step, two (of different lengths) after
    texts = [""] * len(items)

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        for item, delta in events:
            texts[item.stream] += delta.text

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        return arrivals.pop(0) if arrivals else []

    joined: list[int] = []
    joining_pass = ContinuousBatch._joining_pass

    def spy(batch: ContinuousBatch, rows: list) -> list:
        joined.append(len(rows))
        return joining_pass(batch, rows)

    monkeypatch.setattr(ContinuousBatch, "_joining_pass", spy)
    engine.run(items[:1], on_step, poll=poll, max_batch_size=4)
    assert joined == [1, 2]  # both arrivals were prefilled in a step's own pass
    assert texts == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_do_not_depend_on_how_many_rows_run_beside_them(dtype: torch.dtype) -> None:
    # One row alone included: oneDNN's float32 kernel for a single row rounds differently from the one for
    # several (a [3072 -> 768] layer here), which the layer avoids by computing fewer than MIN_PACKED_ROWS
    # rows as that many.
    if dtype == torch.bfloat16 and not cpu_flags() & set(NATIVE_BF16_FLAGS):
        pytest.skip("bfloat16 layers are packed only where the CPU has it natively")
    torch.manual_seed(2)
    shapes = ((768, 2304), (3072, 768))
    layers = [PackedLinear(torch.randn(o, i).to(dtype), torch.randn(o).to(dtype), rows_hint=16) for i, o in shapes]
    for layer in layers:
        x = torch.randn(16, layer.in_features).to(dtype)
        together = layer(x)
        for rows in (1, 2, 3, 4, 5, 9):
            assert torch.equal(layer(x[:rows]), together[:rows])
        assert layer(x[:1].reshape(1, 1, -1)).shape == (1, 1, layer.out_features)  # a decode step's [rows, 1, hidden]
        expected = x.float() @ layer_weight(layer).float().t() + layer.bias.float()
        torch.testing.assert_close(
            together.float(),
            expected,
            rtol=1e-4 if dtype == torch.float32 else 2e-2,
            atol=1e-3 if dtype == torch.float32 else 0.5,
        )


def layer_weight(layer: PackedLinear) -> torch.Tensor:
    """The plain weight back from oneDNN's packed one (the product with the identity)."""
    eye = torch.eye(layer.in_features, dtype=layer.dtype)
    return (torch.ops.mkldnn._linear_pointwise(eye, layer.packed, None, "none", [], "")).t()
