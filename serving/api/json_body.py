"""An answer's JSON body, written a piece at a time so that no single call holds the interpreter long.

A whole answer with log-probabilities holds tens of thousands of entries. ``model_dump`` and
``json.dumps`` each walk it in one call into C, and a call into C keeps the GIL until it returns: on a
worker thread it still stalls the Gateway's event loop for that long (about 0.1 s each for three choices
of 480 tokens with 20 alternatives). Here a model whose subtree is large is dumped field by field, and a
long list a slice of at most :data:`PIECE` elements at a time, so the loop gets its turns in between. The
bytes are those of ``JSONResponse(model.model_dump(mode="json"))``, keys in the same order.

>>> from pydantic import BaseModel
>>> class Row(BaseModel):
...     name: str
...     values: list[float]
>>> json_body(Row(name="a", values=[0.5] * 3), piece=2)
b'{"name":"a","values":[0.5,0.5,0.5]}'
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.responses import Response

PIECE = 256  # the most list elements (or dict items) one call into C serialises
RECORD_WEIGHT = 16  # a record counts as this many elements: 16 records per call at the default piece


class Records(list):
    """A list of small plain JSON values (dicts, lists and scalars, up to a few dozen leaves each, no
    models), as log-probability entries are. Its producer vouches for that, so it is written
    ``piece // RECORD_WEIGHT`` records per call into C without the walk that looks for large containers
    (a walk that cost as much as the writing for 30,000 entries)."""


# What Starlette's JSONResponse writes: compact, UTF-8, no NaN.
_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# Renders the large answers, one at a time (its thread starts on first use): one thread, since each more
# one would contend with the event loop for the GIL.
_RENDER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")


def json_response(answer: BaseModel, headers: Mapping[str, str] | None = None) -> Response:
    """``answer`` as a whole JSON answer (what ``JSONResponse(answer.model_dump(mode="json"))`` sends)."""
    return Response(json_body(answer), media_type="application/json", headers=headers)


async def off_the_loop(render: Callable[[], Response]) -> Response:
    """``render()`` on the render thread: for an answer that can hold tens of thousands of values (log-
    probabilities, embeddings), which built on the event loop would hold every other request for as long."""
    return await asyncio.get_running_loop().run_in_executor(_RENDER_THREAD, render)


def json_body(value: BaseModel, piece: int = PIECE) -> bytes:
    """``value.model_dump(mode="json")`` as compact JSON bytes, written in pieces."""
    out: list[str] = []
    _write(value, out, piece)
    return "".join(out).encode()


def _records_per_call(piece: int) -> int:
    return max(1, piece // RECORD_WEIGHT)


def _big(value: Any, piece: int) -> bool:
    """Whether ``value`` holds a list or dict of more than ``piece`` elements (the walk stops at the first)."""
    if isinstance(value, Records):
        return len(value) > _records_per_call(piece)
    if isinstance(value, BaseModel):
        return any(_big(v, piece) for v in value.__dict__.values())
    if isinstance(value, list | tuple):
        return len(value) > piece or any(_big(v, piece) for v in value)
    if isinstance(value, dict):
        return len(value) > piece or any(_big(v, piece) for v in value.values())
    return False


def _write(value: Any, out: list[str], piece: int) -> None:
    if isinstance(value, BaseModel):
        _write_model(value, out, piece)
    elif isinstance(value, Records):
        step = _records_per_call(piece)
        out.append("[")
        for start in range(0, len(value), step):
            out.append(("," if start else "") + _dumps(value[start : start + step])[1:-1])
        out.append("]")
    elif isinstance(value, list | tuple):
        out.append("[")
        for start in range(0, len(value), piece):
            part = value[start : start + piece]
            if start:
                out.append(",")
            if any(isinstance(v, BaseModel) or _big(v, piece) for v in part):
                for i, v in enumerate(part):
                    if i:
                        out.append(",")
                    _write(v, out, piece)
            else:
                out.append(_dumps(to_jsonable_python(list(part)))[1:-1])
        out.append("]")
    elif isinstance(value, dict) and _big(value, piece):
        out.append("{")
        for i, (key, v) in enumerate(value.items()):
            out.append(("," if i else "") + _dumps(str(key)) + ":")
            _write(v, out, piece)
        out.append("}")
    else:
        out.append(_dumps(to_jsonable_python(value)))


def _write_model(model: BaseModel, out: list[str], piece: int) -> None:
    large = {name for name, v in model.__dict__.items() if _big(v, piece)}
    if not large or _custom(type(model)):  # small, or serialised its own way: pydantic's dump
        out.append(_dumps(model.model_dump(mode="json")))
        return
    small = model.model_dump(mode="json", exclude=large)
    out.append("{")
    for i, name in enumerate(n for n in type(model).model_fields if n in small or n in large):
        out.append(("," if i else "") + _dumps(name) + ":")
        if name in large:
            _write(getattr(model, name), out, piece)
        else:
            out.append(_dumps(small[name]))
    out.append("}")


def _custom(cls: type[BaseModel]) -> bool:
    """Whether ``cls`` serialises other than field by field (serializers, computed fields, extra fields)."""
    decorators = cls.__pydantic_decorators__
    return bool(
        decorators.field_serializers
        or decorators.model_serializers
        or cls.model_computed_fields
        or cls.model_config.get("extra") == "allow"
    )
