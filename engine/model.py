"""Load a Hugging Face model and generate for batches of rows, streaming each step's deltas."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from engine.chat import encode_chat, render_chat
from engine.continuous import ContinuousBatch, new_cache, supports
from engine.cpu import auto_cpu_dtype, emulated_on_cpu, stored_float32
from engine.detokenize import IncrementalDetokenizer
from engine.errors import PromptTooLongError
from engine.loading import load_weights, placement_facts, touch_weights, weights_facts
from engine.logprobs import TokenTexts
from engine.packed_cache import open_cache, prepare_cached
from engine.processors import LogitsRules
from engine.sampling import BatchState, Row, RowSampler, RowStopper
from engine.scoring import check_token_prompts
from engine.timing import PhaseTimer
from engine.types import ChatMessage, Completion, Delta, SamplingParams, collect
from engine.work import OnStep, Poll, WorkItem, emit

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Generation options of a model's own generation_config that we reset: sampling is per request
# (ours), beam search is off, and length limits come from each request.
_RESET = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "min_p": None,
    "typical_p": None,
    "repetition_penalty": None,
    "length_penalty": None,
    "min_length": None,
    "min_new_tokens": None,
    "max_length": None,
    "stop_strings": None,
}


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to load a model.

    Example::

        >>> EngineConfig(model_id="facebook/opt-125m", device="cpu", dtype="float32").resolved_dtype()
        torch.float32
    """

    model_id: str
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    num_threads: int | None = None
    max_prompt_tokens: int | None = None  # None: min(context, max_batch_tokens) - 1
    max_batch_tokens: int | None = None  # key/value cache per batch, in tokens (engine.admission)
    continuous_batching: bool = True
    # Placement (engine.placement): the replica's GPUs, how much of each to use, and room for the
    # key/value cache of max_batch_size rows of the longest sequence a request may make.
    num_gpus: float = 0.0
    gpu_memory_utilization: float = 0.9
    cpu_offload_gb: float = 0.0
    max_batch_size: int = 16
    max_new_tokens_limit: int | None = None
    # Budgets in bytes per device (GPU index or "cpu") instead of the computed ones: forces a split
    # between a GPU and host memory, or, on CPU, an offload of what does not fit to disk.
    max_memory: dict[int | str, int] | None = None
    label: str | None = None  # how messages name the model, e.g. "model 'big'"
    # Packed CPU layers kept on disk for the next load (engine.packed_cache): None, or 0 GB, keeps none.
    packed_cache_dir: str | None = None
    packed_cache_gb: float = 32.0
    huge_pages: bool = True  # packed layers moved onto 2 MB pages after the first answer (engine.hugepages)

    def resolved_dtype(self) -> torch.dtype:
        return self.dtype_choice()[0]

    def dtype_choice(self) -> tuple[torch.dtype, str]:
        """The weights' dtype and why: as set, or for ``auto`` what the device does natively.

        Both loaders (generation and embeddings) ask it once per load; a set dtype that this CPU
        emulates is logged as a warning here and named in the reason.
        """
        if self.dtype != "auto":
            slow = emulated_on_cpu(DTYPES[self.dtype]) if self.device == "cpu" else None
            if slow:
                logger.warning("%s: DTYPE=%s, but %s; DTYPE=auto would load float32", self.model_id, self.dtype, slow)
            return DTYPES[self.dtype], "DTYPE" + (f"; {slow}" if slow else "")
        if self.device == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: cuda supports bfloat16"
            return torch.float16, "auto: cuda without bfloat16"
        dtype, why = auto_cpu_dtype()
        return dtype, f"auto: {why}"


def _model_class(model_config: Any, trust_remote_code: bool) -> Any:
    """The concrete class for ``model_config`` (importing its module), or the Auto class for remote code."""
    auto = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    if trust_remote_code or type(model_config) not in auto._model_mapping:
        return auto
    return auto._model_mapping[type(model_config)]


class TextGenerator:
    """A loaded model and tokenizer that generate for batches of rows.

    :meth:`run` is the primitive: it decodes work items in batches and reports each step's
    deltas as they are made; :meth:`generate` collects them for callers that want whole answers.

    Example::

        gen = TextGenerator.load(EngineConfig(model_id="models/pydoc-gpt-mini"))
        params = SamplingParams(max_new_tokens=8)
        [ids] = gen.encode(["Return the"], params)
        [completion] = gen.generate([ids], params)
    """

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(config.device)
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"{config.model_id}: the tokenizer has neither a pad nor an EOS token")
        self.context_length = _context_length(model.config, tokenizer)
        self._generation_config = _base_generation_config(model, self.pad_id)
        eos = self._generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.texts = TokenTexts(tokenizer)
        head = model.get_output_embeddings()  # a Linear, or engine.cpu's PackedLinear
        self.vocab_size = int(getattr(head, "out_features", None) or model.config.vocab_size)
        self.rules = LogitsRules(tokenizer, self.vocab_size, self.eos_ids)  # logit bias, min_tokens, grammars
        # Iteration-level batching where our own loop can drive the model; static batches
        # through generate() otherwise (see engine.continuous).
        self.continuous = config.continuous_batching and supports(model)
        # Kept between batches: a request to an idle engine reuses the buffers (engine.kvcache).
        self.slots = new_cache(model) if self.continuous else None
        # One-off work once a first answer is done (engine.cpu's packing): at the step after a row ends.
        self.after_first_answer: Callable[[], None] | None = None
        # Work other threads hand the engine (between_steps), run on its thread between two steps.
        self._between: list[Callable[[], None]] = []
        self._between_lock = threading.Lock()

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, timer: PhaseTimer | None = None) -> TextGenerator:
        timer = timer or PhaseTimer()
        hf_logging.disable_progress_bar()  # a per-tensor progress bar in every replica's log helps no one
        if config.device == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype, dtype_reason = config.dtype_choice()
        remote = config.trust_remote_code
        with timer.phase("config"):
            model_config = AutoConfig.from_pretrained(config.model_id, trust_remote_code=remote)
        with timer.phase("tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(config.model_id, trust_remote_code=remote)
        with timer.phase("model_code"):  # the architecture's module and what it pulls in (seconds, once)
            model_cls = _model_class(model_config, remote)
        # DTYPE=auto's bfloat16 for a checkpoint stored in float32 (engine.cpu.prepare_cpu_model):
        # the wake answers in float32, with no conversion before its answer; then bfloat16.
        then_bfloat16 = (
            config.dtype == "auto"
            and config.device == "cpu"
            and dtype == torch.bfloat16
            and not config.max_memory
            and not config.cpu_offload_gb
            and getattr(model_config, "quantization_config", None) is None
            and stored_float32(model_config)
        )
        float32_first = "; the checkpoint is float32: float32 until the first answer ends, then bfloat16"
        timer.facts["dtype_reason"] = dtype_reason + (float32_first if then_bfloat16 else "")  # beside placement's
        with timer.phase("weights"):
            # Straight onto the target devices and dtype: no CPU copy of a GPU model, no float32
            # detour for a half-precision one; spread over the replica's GPUs when it has several.
            model, placed = load_weights(model_cls, model_config, config, torch.float32 if then_bfloat16 else dtype)
            model.eval()
        timer.facts.update(weights_facts(model, timer.phases["weights"]))
        timer.facts["placement"] = {**placement_facts(model), **placed.describe()}
        if then_bfloat16:
            timer.facts["placement"]["dtype_after_first_answer"] = "bfloat16"
        engine = cls(model, tokenizer, config)
        cache = open_cache(config.packed_cache_dir, config.packed_cache_gb) if config.device == "cpu" else None
        with timer.phase("warmup"):
            cpu_facts, later = prepare_cached(
                model,
                cache,
                config.model_id,
                split=placed.device_map is not None,
                rows_hint=config.max_batch_size,
                then_bfloat16=then_bfloat16,
                touch=touch_weights,
                huge_pages=config.huge_pages and config.device == "cpu",
                between_steps=engine.between_steps,
            )
            timer.facts.update(cpu_facts)
            if then_bfloat16 and cpu_facts.get("packed_cache") == "hit":  # bfloat16 from the first answer on
                dtype = torch.bfloat16
                timer.facts["placement"]["dtype"] = "bfloat16"
                timer.facts["placement"].pop("dtype_after_first_answer", None)
                float32_first = "; the checkpoint is float32: its packed bfloat16 layers came from the cache"
                if engine.slots is not None:
                    engine.slots.cast(model.dtype)
            engine.warm_up()
        engine.after_first_answer = later  # a wake does not wait for it
        if then_bfloat16:
            dtype_reason = timer.facts["dtype_reason"] = dtype_reason + float32_first
        logger.info(
            "loaded model=%s class=%s placement=%s dtype=%s (%s) threads=%s context=%s batching=%s phases=%s",
            config.model_id,
            type(model).__name__,
            timer.facts["placement"],
            str(dtype).removeprefix("torch."),
            dtype_reason,
            torch.get_num_threads(),
            engine.context_length,
            "continuous" if engine.continuous else "static",
            timer.phases,
        )
        return engine

    def warm_up(self) -> None:
        """One forward pass (a one-token answer): every weight read once, lazy initialisation done.

        ``load`` has mapped every weight's pages before (``touch_weights``). A second token would
        read every weight again: on CPU a pass costs the weights' size at memory speed (about
        0.2 s per GB here), paid again by every wake-up, and the first request warms the decode
        step's few remaining paths itself.
        """
        ids = self.tokenizer("Hello", add_special_tokens=True)["input_ids"][:1] or [self.pad_id]
        self.generate([ids], SamplingParams(max_new_tokens=1))

    # --- requests ------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], params: SamplingParams) -> list[list[int]]:
        """Token ids per prompt; raises PromptTooLongError when a prompt cannot fit."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        for index, ids in enumerate(encoded):
            self._check_fits(index, len(ids), params.max_new_tokens, len(prompts) > 1)
        return encoded

    def encode_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Token-id prompts, used as they are (no special tokens added), checked like text prompts."""
        encoded = check_token_prompts(prompts, self.vocab_size)
        for index, ids in enumerate(encoded):
            self._check_fits(index, len(ids), params.max_new_tokens, len(prompts) > 1)
        return encoded

    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        template: str | None = None,
        tools: str | None = None,
    ) -> list[int]:
        """Token ids of a chat rendered with the model's chat template (or ``template``).

        Raises ChatTemplateError when there is no template or it refuses the messages, and
        PromptTooLongError when the rendered chat cannot fit.
        """
        ids = encode_chat(self.tokenizer, render_chat(self.tokenizer, messages, template, tools))
        self._check_fits(0, len(ids), params.max_new_tokens, False)
        return ids

    @property
    def max_prompt_tokens(self) -> int | None:
        """MAX_PROMPT_TOKENS, or when unset: the context and the batch budget, less one token to generate."""
        if self.config.max_prompt_tokens is not None:
            return self.config.max_prompt_tokens
        bounds = [b for b in (self.context_length, self.config.max_batch_tokens) if b is not None]
        return min(bounds) - 1 if bounds else None

    def _check_fits(self, index: int, n_prompt: int, max_new_tokens: int, many: bool) -> None:
        which = f"prompt {index}" if many else "the prompt"
        # Unset, the derived limit (max_prompt_tokens) follows from the two checks below, whose messages say more.
        limit = self.config.max_prompt_tokens
        if limit is not None and n_prompt > limit:
            raise PromptTooLongError(
                f"{which} has {n_prompt} tokens; this service accepts at most {limit} (MAX_PROMPT_TOKENS)."
            )
        budget = self.config.max_batch_tokens
        if budget is not None and n_prompt + max_new_tokens > budget:
            raise PromptTooLongError(
                f"{which} has {n_prompt} tokens and max_new_tokens is {max_new_tokens}: together they need more "
                f"key/value cache than one batch may hold ({budget} tokens, MAX_BATCH_TOKENS). Shorten the "
                f"prompt or lower max_new_tokens to {max(budget - n_prompt, 0)}."
            )
        if n_prompt == 0 and not self.is_encoder_decoder:
            raise PromptTooLongError(f"{which} encodes to no tokens; send some text.")
        ctx = self.context_length
        if ctx is None:
            return
        if self.is_encoder_decoder:
            if n_prompt > ctx or max_new_tokens > ctx:
                raise PromptTooLongError(
                    f"{which} has {n_prompt} tokens and max_new_tokens is {max_new_tokens}; the model reads and "
                    f"writes at most {ctx} tokens each. Shorten the prompt or lower max_new_tokens."
                )
        elif n_prompt + max_new_tokens > ctx:
            raise PromptTooLongError(
                f"{which} has {n_prompt} tokens and max_new_tokens is {max_new_tokens}: together they exceed the "
                f"model's context of {ctx} tokens. Shorten the prompt or lower max_new_tokens to "
                f"{max(ctx - n_prompt, 0)}."
            )

    @torch.inference_mode()
    def run(
        self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None = None, max_batch_size: int | None = None
    ) -> None:
        """Generate for ``items``; ``on_step(events)`` hears of every step's deltas the moment it ends.

        With continuous batching, ``poll(free_slots)`` is asked between steps for more items to
        join (at most ``max_batch_size`` rows decode together), and cancelled items leave at the
        next step. Each row's last delta carries its finish reason.
        """
        try:
            self._run_between_steps()
            if self.continuous:
                self._run_continuous(list(items), on_step, poll, max_batch_size or len(items))
            else:
                self._run_static(list(items), on_step)
            self._first_answer_done()  # a batch that ended without one (static, or all cancelled)
        except Exception:
            # The failed batch's tensors are gone; give their device memory back before the next one.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise

    def between_steps(self, work: Callable[[], None]) -> None:
        """Have the engine's thread run ``work`` between two decode steps, or before its next batch when idle.

        For what must not change under a running forward pass (``engine.hugepages`` points the layers at
        their new bytes); any thread may call it. A failure is logged, and the batch goes on.
        """
        with self._between_lock:
            self._between.append(work)

    def _run_between_steps(self) -> None:
        if not self._between:  # the common case, without the lock
            return
        with self._between_lock:
            work, self._between = self._between, []
        for job in work:
            try:
                job()
            except Exception:
                logger.exception("work handed to the engine between steps failed")

    def _first_answer_done(self) -> None:
        """Run the one-off work, once: its answers have gone out already; rows still running wait for it."""
        work, self.after_first_answer = self.after_first_answer, None
        if work is None:
            return
        work()
        if self.slots is not None:  # the model may now compute in another dtype: its cache follows
            self.slots.cast(self.model.dtype)

    def generate(
        self, prompt_ids: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Whole completions, one per prompt (in order), collected from :meth:`run`'s deltas."""
        per_row = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        items = [
            WorkItem(stream=0, row=i, prompt_ids=list(ids), params=p)
            for i, (ids, p) in enumerate(zip(prompt_ids, per_row, strict=True))
        ]
        events: list[tuple[WorkItem, Delta]] = []
        self.run(items, events.extend)
        return collect((delta for _, delta in events), len(items), [len(ids) for ids in prompt_ids])

    def _row(self, item: WorkItem) -> Row:
        row = Row(item, IncrementalDetokenizer(self.tokenizer, item.params.stop, item.params.min_tokens))
        row.processors = self.rules.for_row(item.params)
        return row

    def _run_continuous(self, items: list[WorkItem], on_step: OnStep, poll: Poll | None, max_batch_size: int) -> None:
        batch = ContinuousBatch(self.model, self.pad_id, self.eos_ids, self.texts, self.slots)

        def more(free: int) -> list[WorkItem]:  # queued rows that fit the batch, at most ``free``
            return list(poll(free, batch.shape())) if poll is not None and free > 0 else []

        pending = items
        while True:
            joined = 0
            while pending and not batch.joins_step([len(item.prompt_ids) for item in pending]):
                emit(on_step, batch.admit([self._row(item) for item in pending]))
                # Rows that came during that prefill join before the next step (a wave of arrivals, pass after
                # pass); at most max_batch_size join between two steps, so the running rows keep decoding.
                joined += len(pending)
                pending = more(min(max_batch_size - len(batch.rows), max_batch_size - joined))
            dropped = batch.drop_cancelled()
            # Rows that arrived while others decode are prefilled in the step's own pass (batch.joins_step).
            joining, pending = [self._row(item) for item in pending], []
            events = dropped + batch.step(joining) if batch.rows or joining else dropped
            emit(on_step, events)
            if self.after_first_answer is not None and any(delta.finish_reason for _, delta in events):
                self._first_answer_done()
            self._run_between_steps()
            # Asked after the step: rows that came during it are prefilled next, into the slots it freed.
            pending = more(max_batch_size - len(batch.rows))
            if not batch.rows and not pending:
                return

    def _run_static(self, items: list[WorkItem], on_step: OnStep) -> None:
        input_ids, attention_mask = self._pad([item.prompt_ids for item in items])
        rows = [self._row(item) for item in items]
        width = input_ids.shape[1]
        seen_from = [0 if self.is_encoder_decoder else width - len(item.prompt_ids) for item in items]
        state = BatchState(rows, seen_from, self.eos_ids, self.texts, on_step)
        config = GenerationConfig(**self._generation_config.to_dict())
        config.max_new_tokens = max(item.params.max_new_tokens for item in items)
        self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(state)]),
            stopping_criteria=StoppingCriteriaList([RowStopper(state)]),
        )
        # Rows still open when generate() ended ran out of room (the model's own length limit).
        leftover = [(row.item, _end(row)) for row in rows if row.finish_reason is None]
        emit(on_step, leftover)

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Decoder-only models continue from the last position, so pad on the left; an encoder
        # reads the whole input, and its models are trained with right padding.
        width = max(len(ids) for ids in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if self.is_encoder_decoder:
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            else:
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)


def _context_length(model_config: Any, tokenizer: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def _base_generation_config(model: Any, pad_id: int) -> GenerationConfig:
    """The model's own generation config (structural tokens, forced BOS/EOS) minus what requests set."""
    config = GenerationConfig(**model.generation_config.to_dict())
    config.update(**_RESET)
    config.pad_token_id = pad_id
    if config.eos_token_id is None and model.config.eos_token_id is not None:
        config.eos_token_id = model.config.eos_token_id
    return config


def _end(row: Row) -> Delta:
    """The last delta of a row that generate() stopped without our say (its held text, "length")."""
    row.finish_reason = "length"
    text = row.detokenizer.flush() if row.detokenizer is not None else ""
    return Delta(row.item.row, text, 0, finish_reason="length")
