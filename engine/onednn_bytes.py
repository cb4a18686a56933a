"""oneDNN tensors over bytes that torch does not own, and the bytes of those it does.

Torch's ahead-of-time compiler stores a packed weight as its bytes plus oneDNN's description of their
layout, and makes a oneDNN tensor over them again when it loads (``aoti_torch_create_tensor_from_blob_v2``
with the ``_mkldnn`` layout). :mod:`engine.packed_cache` does the same with a mapped file: these are the
few calls it needs, with ``supported`` saying whether this build of torch has them.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch


def supported() -> bool:
    """Whether this build of torch can hand out packed layers' bytes and make them back into layers."""
    try:
        _blob_api()
        return all(hasattr(torch.ops.mkldnn, op) for op in ("data_ptr", "_nbytes", "_get_mkldnn_serialized_md"))
    except (OSError, AttributeError, RuntimeError):
        return False


@functools.cache
def _blob_api() -> tuple[Any, int, int, dict[torch.dtype, int]]:
    """torch's C function that makes a oneDNN tensor over given bytes (what its compiled models use)."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    create = lib.aoti_torch_create_tensor_from_blob_v2
    create.restype = ctypes.c_int32
    int64s = ctypes.POINTER(ctypes.c_int64)
    create.argtypes = [ctypes.c_void_p, ctypes.c_int64, int64s, int64s, ctypes.c_int64, ctypes.c_int32,
                       ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32,
                       ctypes.c_char_p, ctypes.c_int64]  # fmt: skip
    for name in ("aoti_torch_layout__mkldnn", "aoti_torch_device_type_cpu", "aoti_torch_dtype_bfloat16",
                 "aoti_torch_dtype_float32"):  # fmt: skip
        getattr(lib, name).restype = ctypes.c_int32
    torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr  # noqa: B018 - present, or AttributeError now
    dtypes = {torch.bfloat16: lib.aoti_torch_dtype_bfloat16(), torch.float32: lib.aoti_torch_dtype_float32()}
    return create, lib.aoti_torch_layout__mkldnn(), lib.aoti_torch_device_type_cpu(), dtypes


def tensor_over(address: int, shape: list[int], dtype: torch.dtype, layout: bytes) -> torch.Tensor | None:
    """A oneDNN tensor over the bytes at ``address`` (not copied: they must outlive it), or None.

    ``layout`` must be what :func:`layout` gave for such a tensor: oneDNN reads it as it is, and
    other bytes can crash the process (:mod:`engine.packed_cache` checks its index's digest first).
    """
    create, mkldnn, cpu, dtypes = _blob_api()
    sizes = (ctypes.c_int64 * 2)(*shape)
    strides = (ctypes.c_int64 * 2)(shape[1], 1)
    handle = ctypes.c_void_p()
    if create(address, 2, sizes, strides, 0, dtypes[dtype], cpu, 0, ctypes.byref(handle), mkldnn, layout, len(layout)):
        return None
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype, capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule(handle.value, None, None))


def address(packed: torch.Tensor) -> int:
    """Where a oneDNN tensor's bytes are (``size`` of them)."""
    return torch.ops.mkldnn.data_ptr(packed)


def size(packed: torch.Tensor) -> int:
    """How many bytes a oneDNN tensor's layout takes (blocks may be padded)."""
    return torch.ops.mkldnn._nbytes(packed)


def layout(packed: torch.Tensor) -> bytes:
    """oneDNN's own description of a tensor's layout, as :func:`tensor_over` takes it back."""
    return torch.ops.mkldnn._get_mkldnn_serialized_md(packed).numpy().tobytes()
