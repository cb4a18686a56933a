"""CPU specifics of the engine: whether bfloat16 is native here, fused activations, a faster output head.

``DTYPE=auto`` on a CPU picks bfloat16 only where the CPU computes it natively (AVX512-BF16 or
AMX-BF16, read from the kernel's CPU flags): there oneDNN runs bfloat16 matrix products at about
twice the float32 rate and the weights and cache take half the memory bandwidth. Elsewhere
bfloat16 is emulated and slower than float32, so auto stays float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

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
