"""Pre-quantized checkpoints: which methods load where, and with which extra package.

A checkpoint says how it was quantized in its config (``quantization_config.quant_method``) and
``from_pretrained`` applies it; this module checks the combination first, so that a GPU-only
method on a CPU replica or a missing package fails the load with one sentence that names the
method and what to do, before any weight is read. The table follows what transformers 5.23's
quantizers check; methods it does not list are left to transformers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class QuantizationError(ValueError):
    """The checkpoint's quantization method cannot load on this replica."""


@dataclass(frozen=True)
class Method:
    """One quantization method: the Python modules it needs (pip names) and the devices it runs on."""

    packages: dict[str, str]  # importable module -> pip package
    devices: frozenset[str]
    note: str = ""


METHODS: dict[str, Method] = {
    "awq": Method({"gptqmodel": "gptqmodel"}, frozenset({"cuda", "cpu"}), "kernels from gptqmodel"),
    "gptq": Method({"optimum": "optimum", "gptqmodel": "gptqmodel"}, frozenset({"cuda", "cpu"})),
    "bitsandbytes": Method({"bitsandbytes": "bitsandbytes"}, frozenset({"cuda", "cpu"}), "4-bit and 8-bit"),
    "compressed-tensors": Method({"compressed_tensors": "compressed-tensors"}, frozenset({"cuda", "cpu"})),
    "fp8": Method({}, frozenset({"cuda"}), "fine-grained FP8; compute capability 8.9+ for FP8 kernels"),
    "fbgemm_fp8": Method({"fbgemm_gpu": "fbgemm-gpu"}, frozenset({"cuda"})),
    "torchao": Method({"torchao": "torchao"}, frozenset({"cuda", "cpu"})),
    "hqq": Method({"hqq": "hqq"}, frozenset({"cuda", "cpu"})),
    "quanto": Method({"optimum.quanto": "optimum-quanto"}, frozenset({"cuda", "cpu"})),
    "eetq": Method({"kernels": "kernels"}, frozenset({"cuda"})),
    "higgs": Method({"flute": "flute-kernel"}, frozenset({"cuda"})),
    "vptq": Method({"vptq": "vptq"}, frozenset({"cuda"})),
    "aqlm": Method({"aqlm": "aqlm[gpu,cpu]"}, frozenset({"cuda", "cpu"})),
    "mxfp4": Method({}, frozenset({"cuda", "cpu"}), "on CPU transformers dequantizes it to bfloat16"),
}


def describe(model_config: Any) -> dict[str, Any] | None:
    """The checkpoint's quantization as data (method, bits where stated), or None when it has none.

    >>> from types import SimpleNamespace as C
    >>> describe(C(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128}))
    {'method': 'gptq', 'bits': 4}
    >>> describe(C()) is None
    True
    """
    config = getattr(model_config, "quantization_config", None)
    if config is None:
        return None
    data = config if isinstance(config, dict) else config.to_dict()
    method = data.get("quant_method", "unknown")
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum, or a string
    out: dict[str, Any] = {"method": method}
    bits = data.get("bits") or data.get("w_bit") or data.get("nbits")
    if data.get("load_in_4bit"):
        bits = 4
    elif data.get("load_in_8bit"):
        bits = 8
    if bits:
        out["bits"] = bits
    return out


def check(
    model_config: Any,
    device: str,
    label: str = "the model",
    installed: Callable[[str], bool] | None = None,
) -> dict[str, Any] | None:
    """Raise :class:`QuantizationError` when the checkpoint's method cannot load on ``device``.

    Returns :func:`describe`'s answer. ``installed(module)`` says whether a module can be imported
    (a test hands a fake one).

    >>> from types import SimpleNamespace as C
    >>> check(C(quantization_config={"quant_method": "fp8"}), "cpu")
    Traceback (most recent call last):
    ...
    engine.quantization.QuantizationError: the model is quantized with fp8, which runs on cuda only; ...
    """
    facts = describe(model_config)
    if facts is None:
        return None
    name = facts["method"]
    method = METHODS.get(name)
    if method is None:
        return facts  # a method we have no entry for: transformers decides, and says why it refuses
    if device not in method.devices:
        raise QuantizationError(
            f"{label} is quantized with {name}, which runs on {'/'.join(sorted(method.devices))} only; this replica "
            f"runs on {device}. Serve it on a GPU (NUM_GPUS_PER_REPLICA > 0) or pick a checkpoint quantized for CPU "
            "(torchao, bitsandbytes, gptq, ...)."
        )
    installed = installed or _importable
    missing = [pip for module, pip in method.packages.items() if not installed(module)]
    if missing:
        raise QuantizationError(
            f"{label} is quantized with {name}, which needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            f"in the replicas' environment (requirements-serve.txt or the runtime env)."
        )
    return facts


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing ("optimum" for "optimum.quanto")
        return False
