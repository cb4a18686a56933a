"""CPU specifics of the engine: whether bfloat16 is native here, fused activations, a faster output head.

``DTYPE=auto`` on a CPU picks bfloat16 only where the CPU computes it natively (AVX512-BF16 or
AMX-BF16, read from the kernel's CPU flags): there oneDNN runs bfloat16 matrix products at about
twice the float32 rate and the weights and cache take half the memory bandwidth. Elsewhere
bfloat16 is emulated and slower than float32, so auto stays float32.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention import use_decode_attention

logger = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where the kernel does not list them, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def auto_cpu_dtype(flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """The dtype ``DTYPE=auto`` gives a CPU model, and why (for the log and the cold-start report).

    Example::

        >>> auto_cpu_dtype({"avx512f", "avx512_bf16"})
        (torch.bfloat16, 'cpu has avx512_bf16')
        >>> auto_cpu_dtype({"avx2"})
        (torch.float32, 'no native bfloat16 on this cpu (avx512_bf16, amx_bf16)')
    """
    flags = cpu_flags() if flags is None else flags
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return torch.bfloat16, f"cpu has {native[0]}"
    return torch.float32, f"no native bfloat16 on this cpu ({', '.join(NATIVE_BF16_FLAGS)})"


# Where a CPU computes each half-precision dtype natively; elsewhere oneDNN emulates it.
NATIVE_HALF_FLAGS = {torch.bfloat16: NATIVE_BF16_FLAGS, torch.float16: ("avx512_fp16", "amx_fp16")}


def emulated_on_cpu(dtype: torch.dtype, flags: set[str] | None = None) -> str | None:
    """Why ``dtype`` computes slower than float32 on this CPU (it lacks the instructions), or None.

    ``DTYPE=auto`` never picks such a dtype; an explicit ``DTYPE`` gets it, with this in the load's
    warning and the cold-start report's ``dtype_reason``.

    Example::

        >>> emulated_on_cpu(torch.bfloat16, {"avx2"})
        'this cpu lists no native bfloat16 (avx512_bf16, amx_bf16): it is emulated, slower than float32 here'
        >>> emulated_on_cpu(torch.bfloat16, {"avx512_bf16"}), emulated_on_cpu(torch.float32, {"avx2"})
        (None, None)
    """
    native = NATIVE_HALF_FLAGS.get(dtype)
    if native is None or (cpu_flags() if flags is None else flags) & set(native):
        return None
    name = str(dtype).removeprefix("torch.")
    return f"this cpu lists no native {name} ({', '.join(native)}): it is emulated, slower than float32 here"


def fuse_activations(model: Any) -> int:
    """Replace GPT-2's ``gelu_new`` modules (six element-wise kernels) by the same function fused in one.

    ``NewGELUActivation`` computes ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` op by op;
    ``GELUTanh`` is ``torch.nn.functional.gelu(x, approximate="tanh")``, the same formula in one
    kernel (equal up to float rounding). Returns how many modules were replaced.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


class CpuHead(torch.nn.Linear):
    """The output projection (hidden -> vocabulary) for several rows at once, fast on CPU.

    With a few rows, ``x @ W.T`` through MKL runs at a third of the speed of ``W @ x.T`` for a
    vocabulary-sized ``W`` (GPT-2-small: 38 ms against 13 ms for 2 rows on 2 cores, and the head
    is the largest matrix of the model), so batched decoding lost most of its gain there. Same
    weights and result (up to float rounding); one row keeps the plain path, fastest for it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= 1:
            return super().forward(x)
        out = (self.weight @ x.reshape(rows, x.shape[-1]).t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_cpu_head(model: Any) -> None:
    """Compute the model's output projection with :class:`CpuHead` (same module, same parameters)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter:  # not a quantized weight
        head.__class__ = CpuHead


# A packed layer computes fewer rows than this as this many (the others zeros). oneDNN picks its kernel by
# the row count, and for 1 and 2 rows it picks ones that read the weight slower than the one for 4. On the
# AMD VM (AVX512-BF16, no AMX), one thread, GPT-2-small (``python -m benchmarks.packed_rows``), the 49
# products of a token at 1, 2, 3 rows took 16.3, 18.8, 14.1 ms as they were against 15.5, 15.1, 14.5 as
# four in bfloat16, and 32.0, 39.6, 26.1 against 27.3, 26.1, 25.5 ms in float32; a generated token at
# 1 and 2 rows 1.08x and 1.18x faster in bfloat16, 1.19x and 1.34x in float32, 3 rows alike within the
# noise. A row's sums do not depend on the rows beside it in the kernel for 4, and the float32 one for a
# lone row rounds differently, so a row gets the same answer alone as beside others
# (tests/unit/test_cpu_kernels.py).
MIN_PACKED_ROWS = 4


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight oneDNN has reordered once, after load, into its own blocked layout.

    ``nn.Linear`` and GPT-2's ``Conv1D`` hand oneDNN a plain row-major weight at every call, which
    it reads at about half the memory bandwidth its prepacked layout gets: on this project's CPU
    (AVX512-BF16, one thread) a GPT-2-small decode step's matrix products take 17 ms packed
    against 30 ms plain at 16 rows, and the vocabulary head 7 ms against 13 ms; float32 layers
    gain about 1.6x at 16 rows. In bfloat16 results equal ``F.linear``'s (the same oneDNN kernels);
    float32's differ from MKL's in rounding. Torch's own compiler packs weights the same way
    (inductor's ``freezing``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        self.bias = None if bias is None else bias.detach()
        self.dtype = weight.dtype
        # An activation oneDNN applies to the product's float32 sums before rounding them
        # (fold_activations): ("none", "") or ("gelu", "tanh" | "none").
        self.activation: tuple[str, str] = ("none", "")
        self.backing: Any = None  # what holds the packed bytes when they are not torch's own (a mapped file)

    @classmethod
    def mapped(cls, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, backing: Any) -> PackedLinear:
        """A layer over weight bytes packed earlier (``engine.packed_cache``); ``backing`` keeps them alive."""
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.out_features, layer.in_features = packed.shape
        layer.packed, layer.bias, layer.dtype, layer.backing = packed, bias, dtype, backing
        layer.activation = ("none", "")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = self.activation
        rows = x.numel() // self.in_features
        if 0 < rows < MIN_PACKED_ROWS:  # zero rows up to the kernel that reads the weight fastest
            padded = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, MIN_PACKED_ROWS - rows))
            out = torch.ops.mkldnn._linear_pointwise(padded, self.packed, self.bias, attr, [], algorithm)
            return out[:rows].reshape(*x.shape[:-1], self.out_features)
        # The packed kernel reads its input as dense rows: a strided view must be made dense first.
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        folded = "" if self.activation[0] == "none" else f", activation={'_'.join(self.activation)}"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={dtype}{folded}"


# MLPs whose forward is ``act(linear(x))`` then more: (class name, linear's attribute, activation's attribute).
_ACTIVATED_LINEARS = {
    "GPT2MLP": ("c_fc", "act"),
    "GPTNeoMLP": ("c_fc", "act"),
    "GPTBigCodeMLP": ("c_fc", "act"),
    "GPTJMLP": ("fc_in", "act"),
    "CodeGenMLP": ("fc_in", "act"),
}


def _onednn_activation(module: torch.nn.Module) -> tuple[str, str] | None:
    """oneDNN's post-op for an activation module, where it computes the same function; else None."""
    from transformers.activations import GELUActivation, GELUTanh

    act = getattr(module, "act", None)
    if type(module) is GELUTanh and isinstance(act, functools.partial) and act.func is F.gelu:
        return ("gelu", "tanh") if act.keywords == {"approximate": "tanh"} else None
    if type(module) is GELUActivation and act is F.gelu:
        return ("gelu", "none")
    return None


def fold_activations(model: Any) -> int:
    """Let each packed MLP input layer apply its GELU itself; the activation module becomes ``Identity``.

    oneDNN applies the GELU to the product's float32 sums before rounding them to the layer's
    dtype, in the same pass: the separate kernel was slow (PyTorch's tanh GELU runs at about 2.5
    ns an element on the Intel VM, 2 ms for a 260-token prefill's [260, 3072] in every
    layer) and rounded twice. Only for MLPs known to compute ``act(linear(x))``
    (:data:`_ACTIVATED_LINEARS`); returns how many were folded.
    """
    folded = 0
    for module in model.modules():
        names = _ACTIVATED_LINEARS.get(type(module).__name__)
        if names is None:
            continue
        linear, act = (getattr(module, name, None) for name in names)
        activation = _onednn_activation(act) if act is not None else None
        if type(linear) is PackedLinear and linear.activation == ("none", "") and activation is not None:
            linear.activation = activation
            setattr(module, names[1], torch.nn.Identity())
            folded += 1
    return folded


def can_pack(model: Any) -> bool:
    """Whether :func:`pack_linears` applies: a CPU model in float32, or in bfloat16 where the CPU has it natively."""
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return model.dtype == torch.float32 or (
        model.dtype == torch.bfloat16 and bool(cpu_flags() & set(NATIVE_BF16_FLAGS))
    )


def transposed(matrix: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``matrix.t().contiguous()``, copied a band of ``block`` rows at a time through a padded buffer.

    The plain copy walks the source a column at a time: every element read is a different cache
    line. A band of 64 source rows keeps the lines it reads in cache while the output's rows are
    written. Each band is first copied into a buffer whose rows are one cache line longer than the
    source's: where a source row is a multiple of 4 KB (a width of 2048 bfloat16, or 6144: GPT-2's
    MLP at 1536), the band's rows would otherwise fall into the same few cache sets and evict each
    other. On the Intel VM, one thread, bfloat16, medians of 5 (with oneDNN's reorder after it, as
    a wake pays it): ``[1536, 6144]`` 1.85 against 1.13 GB/s with the band alone, ``[1024, 4096]``
    1.96 against 1.19, ``[1536, 4608]`` 1.92 against 1.82, ``[6144, 1536]`` 1.50 against 1.48.
    """
    rows, cols = matrix.shape
    out = torch.empty((cols, rows), dtype=matrix.dtype, device=matrix.device)
    pad = max(1, 64 // matrix.element_size())  # one cache line
    buffer = torch.empty((min(block, rows), cols + pad), dtype=matrix.dtype, device=matrix.device)[:, :cols]
    for start in range(0, rows, block):
        band = buffer[: min(block, rows - start)]
        band.copy_(matrix[start : start + block])
        out[:, start : start + block].copy_(band.t())
    return out


def packable_layers(model: Any) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    """(qualified name, parent, attribute, layer) of each layer :func:`pack_linears` packs, in module order.

    ``nn.Linear`` (and the output head) and GPT-2's ``Conv1D`` whose weight is a plain float32 or
    bfloat16 ``Parameter``: quantized weights and other dtypes are left alone.
    """
    from transformers.pytorch_utils import Conv1D

    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if type(weight) is not torch.nn.Parameter or weight.dtype not in (torch.bfloat16, torch.float32):
                continue
            if type(child) in (torch.nn.Linear, CpuHead, Conv1D):
                yield (f"{prefix}.{name}" if prefix else name), module, name, child


def pack_linears(model: Any, rows_hint: int) -> dict[str, Any]:
    """Replace the model's linear layers (and ``Conv1D``) by :class:`PackedLinear`; facts for the report.

    Then each MLP's GELU is folded into the packed layer before it (:func:`fold_activations`).
    Quantized weights, and weights neither float32 nor bfloat16, are left alone. A layer's original
    weight is freed with it, except an output head tied to the input embeddings (the embedding
    lookup still needs the plain matrix): its packed copy costs the head's bytes once more, which
    the facts state.
    """
    tied = model.get_input_embeddings().weight if model.get_input_embeddings() is not None else None
    packed = extra = 0
    for _, module, name, child in packable_layers(model):
        weight = child.weight
        # GPT-2's Conv1D keeps the weight as [in, out]
        matrix = weight if isinstance(child, torch.nn.Linear) else transposed(weight.detach())
        setattr(module, name, PackedLinear(matrix, child.bias, rows_hint))
        packed += 1
        if tied is not None and weight is tied:
            extra += weight.numel() * weight.element_size()
    return {"packed_linears": packed, "packed_extra_bytes": extra, "folded_activations": fold_activations(model)}


def stored_float32(model_config: Any) -> bool:
    """Whether the checkpoint's config says its weights are stored in float32 (``dtype``, or ``torch_dtype``)."""
    stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return str(stored).removeprefix("torch.") == "float32"


def to_bfloat16(model: Any) -> int:
    """Convert the model's float32 parameters to bfloat16 in place; returns how many.

    Each ``Parameter`` keeps its identity (tied weights stay tied) and takes the values a bfloat16
    load would give it (the same round-to-nearest cast). Buffers are left as they are: a model
    loaded in bfloat16 keeps the ones it builds in float32 (rotary frequencies) in float32 too.
    """
    converted = 0
    for parameter in {id(p): p for p in model.parameters()}.values():
        if parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(torch.bfloat16)
            converted += 1
    return converted


def prepare_cpu_model(
    model: Any, split: bool, rows_hint: int, then_bfloat16: bool = False, packed: bool = False
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """What the engine changes in a CPU model after loading it (``split``: offloaded, leave its layers).

    The fused activation always; on one CPU, ``engine.attention``'s implementation (a packed
    prefill that attends prompt by prompt, and the CPU's faster decode step), and prepacked layers (or,
    where oneDNN cannot pack them, the faster output head). Returns facts for the report and, when
    the packing is better left until the engine's first answer is done, that packing.

    When to pack is a matter of measurement (in one process on the Intel VM, AMX, two threads;
    and the wake in ``benchmarks.cold_start``). In bfloat16 oneDNN's kernels on plain weights are
    slow at few rows: a GPT-2-small decode step took 48 ms plain against 30 ms packed at one and
    at four rows (equal at 16), so a 32-token first answer gains about 0.6 s from a packing that
    costs about 0.25 s; bfloat16 packs at load. In float32 the plain path is MKL's, as fast as
    packed at one row (32 against 35 ms), slower at four (53 against 45 ms; at 16 rows equal here,
    1.6x on the AMD VM): reordering every weight costs about as long as reading them twice, which
    a wake from zero would pay before its first answer, so float32 packs once its first answer
    has gone out.
    In bfloat16 packed layers compute exactly what the plain ones do (the same oneDNN kernels); in
    float32 they round differently from MKL's products (about 1e-6 relative) and depend less on
    the rows beside them (MKL's, with two threads, change with every row count;
    tests/unit/test_cpu_kernels.py).

    ``then_bfloat16``: a float32 model that ``DTYPE=auto`` wants in bfloat16 (its checkpoint is
    stored in float32). Converting and packing before the first answer cost a wake about 0.5 s on
    the Intel VM, for a first answer no faster at one row (bfloat16 packed 30 ms a step, float32
    plain 32 ms), so the model answers first in float32, and the work returned converts it to
    bfloat16 and packs it.

    ``packed``: the layers are packed already (``engine.packed_cache``); only the rest is done, their GELUs folded.
    """
    fuse_activations(model)
    if split or model.device.type != "cpu":
        return {}, None
    # SDPA's decode kernel multiplies with AMX tiles; without them two batched products are faster.
    facts: dict[str, Any] = {"attention": use_decode_attention(model, products="amx_bf16" not in cpu_flags())}
    if packed:  # mapped from engine.packed_cache: their MLPs' GELUs fold into them as into freshly packed ones
        facts["folded_activations"] = fold_activations(model)
        return facts, None
    if not can_pack(model) or getattr(model.config, "quantization_config", None) is not None:
        use_cpu_head(model)
        return facts, None

    def pack() -> None:
        started = time.monotonic()
        converted = to_bfloat16(model) if then_bfloat16 else 0
        done = pack_linears(model, rows_hint)
        logger.info(
            "%spacked %s for oneDNN in %.2fs",
            f"converted {converted} parameters to bfloat16, " if converted else "",
            done,
            time.monotonic() - started,
        )

    if model.dtype == torch.bfloat16:
        started = time.monotonic()
        facts.update(pack_linears(model, rows_hint))
        facts["packing"] = f"at load, {time.monotonic() - started:.2f}s"
        return facts, None
    facts["packing"] = "after the first answer" + (", converted to bfloat16" if then_bfloat16 else "")
    return facts, pack
