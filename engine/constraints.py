"""Grammar constraints: a request's :class:`~engine.types.Constraint` compiled once per model and cached.

The library is xgrammar (the default structured-output backend of vLLM and SGLang): a JSON
schema, a regex or an EBNF grammar compiles in about a millisecond for a small vocabulary, and a
row's allowed-token mask fills in microseconds per step on CPU (``benchmarks/structured_output.py``
measures both beside llguidance). JSON is compiled without free whitespace (``any_whitespace=False``):
the answer is compact JSON, and a model cannot spend its tokens on spaces inside an object.

Example::

    grammars = GrammarCache(tokenizer_info(tokenizer, vocab_size=model.config.vocab_size, eos_ids=[0]))
    compiled = grammars.get(Constraint("json_schema", '{"type": "object"}'))   # ConstraintError if refused
    matcher = grammars.matcher(compiled)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from engine.errors import ConstraintError
from engine.types import Constraint

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per model (a compiled JSON schema is tens of kilobytes)
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")  # "[01:20:44] /project/cpp/x.cc:83: " before the reason


# A JSON string character: anything but a quote, a backslash or a control character.
_STRING_CHAR = '[^"\\\\\\x00-\\x1f]'


def bounded_strings(node: Any) -> Any:
    """The schema with ``minLength``/``maxLength`` strings rewritten as the equivalent ``pattern``.

    xgrammar 0.2.8 compiles a length-bounded string to a character class that admits raw control
    characters (invalid JSON: a random model writes them); the pattern bars them and keeps the bounds.
    A string that has a pattern or a format of its own keeps its length bounds as they are.
    """
    if isinstance(node, list):
        return [bounded_strings(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: bounded_strings(value) for key, value in node.items()}
    bounded = "minLength" in out or "maxLength" in out
    if bounded and out.get("type", "string") == "string" and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        if isinstance(low, int) and (high == "" or isinstance(high, int)):
            out["pattern"] = f"^{_STRING_CHAR}{{{low},{high}}}$"
    return out


def refusal_reason(exc: BaseException) -> str:
    """The library's reason, without its source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _CPP_PREFIX.sub("", text)


def tokenizer_info(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """What xgrammar needs of a model's vocabulary (``xgrammar.TokenizerInfo``): its tokens' texts and ends."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_ids))


class GrammarCache:
    """Compiles constraints for one tokenizer, keeping the most recent ``CACHE_SIZE`` of them.

    ``on_compile(seconds, cached)`` hears of every lookup (the metric of compile times).
    """

    def __init__(self, info: Any, on_compile: Callable[[float, bool], None] | None = None) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        # One thread: compiles run in the replica beside decoding, on a few cores.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # the event loop compiles, the engine thread reads
        self._on_compile = on_compile

    def get(self, constraint: Constraint, record: bool = True) -> Any:
        """The compiled grammar; raises ConstraintError naming the request field when it cannot compile.

        ``record``: report the lookup to ``on_compile`` (the replica's check does; the engine's second
        lookup for the same row does not).
        """
        begun = time.perf_counter()
        with self._lock:
            compiled = self._cache.get(constraint.key)
            hit = compiled is not None
            if hit:
                self._cache.move_to_end(constraint.key)
        if not hit:
            compiled = self._compile(constraint)
            with self._lock:
                self._cache[constraint.key] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if record and self._on_compile is not None:
            self._on_compile(time.perf_counter() - begun, hit)
        return compiled

    def cached(self, constraint: Constraint) -> bool:
        with self._lock:
            return constraint.key in self._cache

    def _compile(self, constraint: Constraint) -> Any:
        compiler = self._compiler
        begun = time.perf_counter()
        try:
            if constraint.kind == "json_schema":
                schema = json.dumps(bounded_strings(json.loads(constraint.spec)))
                compiled = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=constraint.strict)
            elif constraint.kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif constraint.kind == "regex":
                compiled = compiler.compile_regex(constraint.spec)
            elif constraint.kind == "choice":
                choices = json.loads(constraint.spec)
                compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
            else:
                compiled = compiler.compile_grammar(constraint.spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConstraintError(
                f"{constraint.param}: the grammar library cannot compile this {constraint.kind.replace('_', ' ')}: "
                f"{refusal_reason(exc)}",
                param=constraint.param,
            ) from None
        logger.info("compiled a %s constraint in %.4f s", constraint.kind, time.perf_counter() - begun)
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)
