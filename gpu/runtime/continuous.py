"""Continuous batching: one decode loop per model that sequences join and leave between steps (torch lazily).

Orca's iteration-level scheduling over a transformers causal LM's own forward: every :meth:`DecodeLoop.step` first
admits waiting sequences (one left-padded prefill forward for all of them, within the KV budget and the prefill
token cap), merges their KV cache into the running batch's, then runs one decode forward for every running
sequence. A sequence leaves as soon as it is done (end-of-sequence token, a stop string, its ``max_new_tokens``,
the model's context, or a cancellation), so a short reply never waits for a long one and new requests never wait
for a batch to end.

The running batch is one left-padded ``DynamicCache``: every row writes its next token at the same column, and an
attention mask hides each row's padding, exactly as transformers' ``generate`` batches left-padded prompts; so a
greedy sequence is token-identical to the same prompt generated alone (within the float tolerance that decides a
near tie) and a seeded sampled one draws from its own generator whatever it runs with. Finished rows are dropped
from the cache in bulk (rows of a just-finished sequence still compute until then), and columns that only padding
uses are cut away.

A prefix that admitted prompts share with the last prompt prefilled (or with each other), of at least
:data:`MIN_SHARED_PREFIX` tokens, is computed once: its keys and values are copied into each joining row and only
the rest of each prompt is prefilled. That saves prefill work (a chat system prompt), not KV memory.

Each job's sampling is its own: greedy rows take the argmax; a sampled row softmaxes its logits at its
temperature, keeps its ``top_p`` nucleus and draws with its own seeded ``torch.Generator``, the same draw as the
static path's (:mod:`gpufleet.gpu.runtime.batching`).

A model whose cache is not plain full-attention ``DynamicLayer``\\ s (sliding windows, state-space layers), whose
forward takes no ``position_ids``, or which is multimodal, is refused by :func:`unsupported_reason`: the worker
serves it on the static path instead.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import DeviceOutOfMemoryError, ForwardError, GpuError
from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.runtime.batching import first_stop
from gpufleet.gpu.runtime.model import Generation, LoadedModel, ModelKind
from gpufleet.gpu.runtime.options import GenerateOptions

if TYPE_CHECKING:
    import torch

__all__ = [
    "DecodeLoop",
    "IncrementalText",
    "LoopEvent",
    "SequenceCancelled",
    "SequenceDone",
    "SequenceFailed",
    "SequenceRequest",
    "TextDelta",
    "kv_bytes_per_token",
    "unsupported_reason",
]

ADVICE = "check the prompt and the generation settings; if every request fails, unload the model so it reloads"
# Dead rows are dropped from the cache once this share of the batch is dead (or when nothing else runs): dropping
# copies the whole cache, so doing it per finished row would cost as much as the decoding.
COMPACT_DEAD_SHARE = 0.25
# Prompts sharing at least this many leading tokens with the last prompt (or with each other) compute them once.
MIN_SHARED_PREFIX = 32


# -- what goes in and what comes out ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceRequest:
    """One generation to run: its key (the job id), its prompt as token ids, and its options."""

    key: str
    prompt_ids: Sequence[int]
    options: GenerateOptions
    stream: bool = False  # emit TextDelta events as the text grows


@dataclass(frozen=True)
class TextDelta:
    """New text of a streamed sequence, in order (their concatenation is the final text)."""

    key: str
    text: str
    completion_tokens: int


@dataclass(frozen=True)
class SequenceDone:
    """A sequence finished: its generation, and when its tokens came (seconds on the loop's clock)."""

    key: str
    generation: Generation
    queued_s: float  # added → admitted
    first_token_s: float  # added → first token
    inter_token_s: tuple[float, ...]  # between consecutive tokens
    prefill_tokens: int  # prompt tokens this sequence's prefill computed


@dataclass(frozen=True)
class SequenceFailed:
    """A sequence could not run (its prefill failed, or the device ran out of memory for it)."""

    key: str
    error: GpuError


@dataclass(frozen=True)
class SequenceCancelled:
    """A sequence was cancelled (revoked, its reader left); its KV rows are freed."""

    key: str
    reason: str
    completion_tokens: int


LoopEvent = TextDelta | SequenceDone | SequenceFailed | SequenceCancelled


# -- incremental text ----------------------------------------------------------------------------------------------


class IncrementalText:
    """A sequence's text as its tokens come, decoded over a short window so each token costs a short decode.

    The window keeps the previous token as context (a tokenizer may drop a leading space when decoding a token
    alone) and a delta is only emitted once it does not end in a partial UTF-8 character.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add a token; returns the text it completed (possibly empty)."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        new = self._decode(self.tokens[self._prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            delta = new[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
            self.text += delta
            return delta
        return ""


# -- eligibility -------------------------------------------------------------------------------------------------


def unsupported_reason(loaded: LoadedModel) -> str | None:
    """Why the decode loop cannot run ``loaded`` (None when it can); checked from the model, without a forward."""
    if loaded.kind is not ModelKind.CAUSAL_LM:
        return f"{loaded.model_id} is not a causal LM"
    module = loaded.module
    config = module.config
    if getattr(config, "vision_config", None) is not None:
        return "a multimodal checkpoint (its text-and-image class keeps its own position ids)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return f"its layers are not all full attention ({', '.join(sorted(set(layer_types)))})"
    if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        return f"sliding-window attention (window {text_config.sliding_window})"
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    if "position_ids" not in parameters or _cache_argument(parameters) is None:
        return "its forward takes no position_ids or no KV cache argument"
    return None


def _cache_argument(parameters: Any) -> str | None:
    """The forward's KV-cache keyword: ``cache`` in recent transformers, ``past_key_values`` before."""
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


# -- the loop -------------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    request: SequenceRequest
    added_at: float
    eos: frozenset[int]
    text: IncrementalText
    generator: torch.Generator | None = None
    admitted_at: float = 0.0
    token_times: list[float] = field(default_factory=list)
    sent: str = ""  # the text already sent as deltas
    finish: FinishReason | None = None
    stop_at: int | None = None  # where a stop string starts in the text
    dead: bool = False  # finished or cancelled; its cache row is dropped at the next compaction
    prefill_tokens: int = 0  # prompt tokens its prefill computed (less than its prompt when a prefix was shared)

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def generated(self) -> list[int]:
        return self.text.tokens


class DecodeLoop:
    """The continuous-batching loop of one loaded model (see the module docstring).

    Args:
        loaded: a causal LM the loop supports (:func:`unsupported_reason` is None).
        max_running: sequences decoded together at most.
        kv_budget_bytes: bytes the KV cache may take; admission keeps the batch's projected cache (every running
            sequence at its longest) within it. None: no byte limit, only ``max_running``.
        max_prefill_tokens: padded prompt tokens one prefill forward may take (longer prompts run alone).
        relieve_memory: called once after a device out-of-memory error, before the step is retried (the worker
            evicts other models and returns cached blocks).
        clock: seconds, for the timings in the events.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_running: int = 64,
        kv_budget_bytes: int | None = None,
        max_prefill_tokens: int = 8192,
        relieve_memory: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        reason = unsupported_reason(loaded)
        if reason is not None:
            raise ForwardError(f"the decode loop cannot run {loaded.model_id!r}: {reason}")
        self.loaded = loaded
        self.max_running = max_running
        self.kv_budget_bytes = kv_budget_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self._relieve = relieve_memory
        self._clock = clock
        module = loaded.module
        config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        eos = module.generation_config.eos_token_id
        self._eos = frozenset(e for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        tokenizer = loaded.tokenizer
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos), 0))
        parameters = inspect.signature(module.forward).parameters
        self._logits_to_keep = "logits_to_keep" in parameters
        self._cache_arg = _cache_argument(parameters) or "past_key_values"
        # transformers before 5.2x takes the cache's write position; later ones derive it from position_ids.
        self._cache_position = "cache_position" in parameters
        self.kv_bytes_per_token = kv_bytes_per_token(config, loaded.dtype)
        self.waiting: list[_Row] = []
        self.rows: list[_Row] = []  # one per row of the cache, in order
        self._cache: Any = None  # transformers' DynamicCache of the running batch
        self._mask: torch.Tensor | None = None  # [rows, width]: 1 where a row has a real token
        self._next: torch.Tensor | None = None  # [rows, 1]: each row's last sampled token, fed next
        self.prefill_tokens = 0  # prompt tokens computed by prefills since the loop started
        # The last prompt prefilled, with its keys and values: a later prompt that shares a long enough prefix
        # with it (a system prompt) reuses them instead of computing them again.
        self._prefix: tuple[list[int], list[tuple[Any, Any]]] | None = None
        self.steps = 0

    # -- the queue ---------------------------------------------------------------------------------------------

    def add(self, request: SequenceRequest) -> None:
        """Queue a sequence; it joins the running batch at the next step with room for it."""
        import torch

        generator = None
        if request.options.sampled:
            generator = torch.Generator(device=self.loaded.device)
            if request.options.seed is not None:
                generator.manual_seed(request.options.seed)
            else:
                generator.seed()
        self.waiting.append(
            _Row(request, self._clock(), self._eos, IncrementalText(self.loaded.tokenizer), generator=generator)
        )

    def cancel(self, key: str, reason: str) -> SequenceCancelled | None:
        """Stop a sequence now (waiting or running); None when the loop does not have it (any more)."""
        for row in self.waiting:
            if row.key == key:
                self.waiting.remove(row)
                return SequenceCancelled(key, reason, 0)
        for row in self.rows:
            if row.key == key and not row.dead:
                row.dead = True
                return SequenceCancelled(key, reason, len(row.generated))
        return None

    @property
    def running(self) -> int:
        return sum(1 for row in self.rows if not row.dead)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    @property
    def kv_bytes(self) -> int:
        """Bytes the running batch's KV cache holds now."""
        if self._cache is None:
            return 0
        return sum(int(layer.keys.nbytes + layer.values.nbytes) for layer in self._cache.layers)

    @property
    def width(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    # -- one step -----------------------------------------------------------------------------------------------

    def step(self) -> list[LoopEvent]:
        """Admit what fits, then decode one token for every running sequence; returns what happened."""
        import torch

        from gpufleet.gpu.runtime.oom import translate_model_errors

        events: list[LoopEvent] = []
        with torch.inference_mode():
            self._compact(force=self.running == 0 or self.waiting != [])
            admitted = self._admit()
            if admitted:
                # A step that prefills ends there: the new sequences' first tokens (and streamed deltas) go out
                # now rather than after one more forward; the running ones decode at the next step.
                events += self._prefill(admitted)
            elif self.running:
                try:
                    with translate_model_errors(self.loaded.model_id, f"decoding {self.running} sequences", ADVICE):
                        events += self._decode()
                except GpuError as exc:  # the batch's forward failed on its inputs: every running sequence fails
                    events += [SequenceFailed(row.key, exc) for row in self.rows if not row.dead]
                    self._cache, self._mask, self._next, self.rows = None, None, None, []
        self.steps += 1
        return events

    def _admit(self) -> list[_Row]:
        """The waiting sequences that join now: in arrival order, within the row cap and the KV budget."""
        admitted: list[_Row] = []
        running = self.running
        prompt_width = 0
        for row in list(self.waiting):
            if running + len(admitted) >= self.max_running:
                break
            width = max(prompt_width, len(row.request.prompt_ids))
            if admitted and (len(admitted) + 1) * width > self.max_prefill_tokens:
                break
            if not self._fits([*admitted, row]):
                if not admitted and running == 0:
                    admitted.append(row)  # alone it must run anyway: the budget check is for company
                break
            admitted.append(row)
            prompt_width = width
        for row in admitted:
            self.waiting.remove(row)
        return admitted

    def _fits(self, joining: list[_Row]) -> bool:
        """Whether the batch with ``joining`` stays within the KV budget when every sequence is at its longest."""
        if self.kv_budget_bytes is None:
            return True
        live = [row for row in self.rows if not row.dead]
        longest_left = max(
            [row.request.options.max_new_tokens - len(row.generated) for row in live]
            + [row.request.options.max_new_tokens for row in joining]
        )
        width = max([self.width] + [len(row.request.prompt_ids) for row in joining]) + longest_left
        return (len(live) + len(joining)) * width * self.kv_bytes_per_token <= self.kv_budget_bytes

    # -- prefill ------------------------------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> list[LoopEvent]:
        """One left-padded forward over the new prompts; their first tokens; their cache joins the batch's."""
        from gpufleet.gpu.runtime.oom import translate_model_errors

        try:
            with translate_model_errors(self.loaded.model_id, f"prefilling {len(rows)} prompts", ADVICE):
                cache, mask, logits, computed = self._retrying(lambda: self._prefill_forward(rows))
        except DeviceOutOfMemoryError as exc:
            if len(rows) == 1:
                return [SequenceFailed(rows[0].key, exc)]
            half = len(rows) // 2  # the pair did not fit at once: each half alone
            return self._prefill(rows[:half]) + self._prefill(rows[half:])
        except GpuError as exc:
            return [SequenceFailed(row.key, exc) for row in rows]
        now = self._clock()
        for row, tokens in zip(rows, computed, strict=True):
            row.admitted_at = now
            row.prefill_tokens = tokens
            self.prefill_tokens += tokens
        self._join(rows, cache, mask)
        sampled = self._sample(rows, logits)
        return self._advance(rows, sampled, now)

    def _prefill_forward(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor, list[int]]:
        """The prefill of ``rows``: their cache and mask, each row's last logits, and the tokens each computed.

        A prefix every prompt shares with the last prompt prefilled (a system prompt) is not computed again: its
        cached keys and values are copied into each row and only the rest of each prompt runs (each row's cache
        is laid out prefix, padding, its own rest; the mask hides the padding).
        """
        import torch

        prompts = [list(row.request.prompt_ids) for row in rows]
        shared, prefix_kv, prefix_computed = self._shared_prefix(prompts)
        rests = [prompt[shared:] for prompt in prompts]
        width = max(len(rest) for rest in rests)
        ids = [[self._pad_id] * (width - len(rest)) + rest for rest in rests]
        rest_mask = [[0] * (width - len(rest)) + [1] * len(rest) for rest in rests]
        device = self.loaded.device
        input_ids = torch.tensor(ids, device=device)
        attention = torch.tensor(rest_mask, device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0) + shared
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        if prefix_kv is not None:
            attention = torch.cat([torch.ones((len(rows), shared), dtype=attention.dtype, device=device), attention], 1)
            kwargs[self._cache_arg] = self._expanded(prefix_kv, len(rows))
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(shared, shared + width, device=device)
        out = self.loaded.module(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **kwargs
        )
        cache = _output_cache(out)
        odd = {type(layer).__name__ for layer in getattr(cache, "layers", [None])} - {"DynamicLayer"}
        if odd:
            raise ForwardError(
                f"the decode loop needs full-attention DynamicLayer caches; {self.loaded.model_id!r} made "
                f"{', '.join(sorted(odd))}"
            )
        self._remember_prefix(prompts[-1], cache, len(rests[-1]))
        computed = [len(rest) for rest in rests]
        computed[0] += prefix_computed
        return cache, attention, out.logits[:, -1, :].float(), computed

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, list[tuple[Any, Any]] | None, int]:
        """The prefix every prompt shares (tokens, its keys and values, tokens computed for it now); (0, None, 0)
        when it is shorter than :data:`MIN_SHARED_PREFIX`.

        The remembered prompt serves arrivals one by one; prompts arriving together that share a prefix nobody
        remembers get it computed once, alone, first. Every prompt keeps at least its last token to compute (its
        logits start the generation).
        """
        longest_shareable = min(len(prompt) for prompt in prompts) - 1
        if self._prefix is not None:
            tokens, kv = self._prefix
            shared = min([longest_shareable, *(_common_length(tokens, prompt) for prompt in prompts)])
            if shared >= MIN_SHARED_PREFIX:
                return shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in kv], 0
        if len(prompts) < 2:
            return 0, None, 0
        shared = min([longest_shareable, *(_common_length(prompts[0], prompt) for prompt in prompts[1:])])
        if shared < MIN_SHARED_PREFIX:
            return 0, None, 0
        return shared, self._compute_prefix(prompts[0][:shared]), shared

    def _compute_prefix(self, tokens: list[int]) -> list[tuple[Any, Any]]:
        import torch

        device = self.loaded.device
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(len(tokens), device=device)
        out = self.loaded.module(
            input_ids=torch.tensor([tokens], device=device),
            attention_mask=torch.ones((1, len(tokens)), dtype=torch.long, device=device),
            position_ids=torch.arange(len(tokens), device=device).unsqueeze(0),
            use_cache=True,
            **kwargs,
        )
        return [(layer.keys, layer.values) for layer in _output_cache(out).layers]

    def _expanded(self, prefix_kv: list[tuple[Any, Any]], rows: int) -> Any:
        """A new cache holding the prefix once per row (copies: each row's cache grows on its own)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, (keys, values) in enumerate(prefix_kv):
            cache.update(
                keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), index
            )
        return cache

    def _remember_prefix(self, prompt: list[int], cache: Any, rest: int) -> None:
        """Keep the last row's prompt keys and values (its shared part and its rest, without padding)."""
        import torch

        if len(prompt) < MIN_SHARED_PREFIX:
            return
        width = None
        kv = []
        for layer in cache.layers:
            keys, values = layer.keys[-1:], layer.values[-1:]
            width = int(keys.shape[2]) if width is None else width
            head = len(prompt) - rest  # the shared columns come first, then padding, then the rest
            keep = list(range(head)) + list(range(width - rest, width))
            index = torch.tensor(keep, device=keys.device)
            kv.append((keys.index_select(2, index), values.index_select(2, index)))
        self._prefix = (prompt, kv)

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Merge a prefill's cache and mask into the running batch's (left-padding the narrower one)."""
        import torch
        import torch.nn.functional as F

        if self._cache is None or self._mask is None or not self.rows:
            self._cache, self._mask, self.rows = cache, mask, list(rows)
            self._next = None
            return
        width = max(self.width, int(mask.shape[1]))
        running_pad, new_pad = width - self.width, width - int(mask.shape[1])
        for running_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            running_layer.keys = torch.cat(
                [F.pad(running_layer.keys, (0, 0, running_pad, 0)), F.pad(new_layer.keys, (0, 0, new_pad, 0))]
            )
            running_layer.values = torch.cat(
                [F.pad(running_layer.values, (0, 0, running_pad, 0)), F.pad(new_layer.values, (0, 0, new_pad, 0))]
            )
        self._mask = torch.cat([F.pad(self._mask, (running_pad, 0)), F.pad(mask, (new_pad, 0))])
        self.rows = self.rows + list(rows)

    # -- decode -------------------------------------------------------------------------------------------------

    def _decode(self) -> list[LoopEvent]:
        import torch

        assert self._cache is not None and self._mask is not None and self._next is not None
        width = self.width
        mask = torch.cat(
            [self._mask, torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self._mask.device)], 1
        )
        positions = mask.sum(-1, keepdim=True) - 1

        kwargs: dict[str, Any] = {self._cache_arg: self._cache}
        if self._cache_position:
            kwargs["cache_position"] = torch.tensor([width], device=mask.device)

        def forward() -> torch.Tensor:
            out = self.loaded.module(
                input_ids=self._next, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
            logits: torch.Tensor = out.logits[:, -1, :].float()
            return logits

        try:
            logits = self._retrying(forward, undo=lambda: self._cut_columns(width))
        except DeviceOutOfMemoryError as exc:
            return self._preempt_newest(exc)
        self._mask = mask
        now = self._clock()
        tokens = self._sample(self.rows, logits)
        return self._advance(self.rows, tokens, now)

    def _retrying(self, run: Callable[[], Any], undo: Callable[[], object] | None = None) -> Any:
        """``run``; after a device out-of-memory error, undo what it wrote, relieve memory and run it once more."""
        from gpufleet.gpu.runtime.oom import is_oom

        try:
            return run()
        except Exception as exc:
            if not is_oom(exc) and not isinstance(exc, DeviceOutOfMemoryError):
                raise
            if undo is not None:
                undo()
            if self._relieve is not None:
                self._relieve()
        try:
            return run()
        except Exception:
            if undo is not None:
                undo()
            raise

    def _preempt_newest(self, exc: DeviceOutOfMemoryError) -> list[LoopEvent]:
        """Out of memory twice for the batch: the newest sequence leaves it (its job is re-routed or refused)."""
        live = [row for row in self.rows if not row.dead]
        newest = max(live, key=lambda row: row.admitted_at)
        newest.dead = True
        self._compact(force=True)
        return [SequenceFailed(newest.key, exc)]

    # -- sampling and stopping ----------------------------------------------------------------------------------

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: greedy rows the argmax; sampled rows from their own generator."""
        import torch

        tokens = logits.argmax(dim=-1).tolist()
        for index, row in enumerate(rows):
            options = row.request.options
            if row.dead or not options.sampled:
                continue
            probs = torch.softmax(logits[index] / float(options.temperature), dim=-1)
            if options.top_p < 1.0:
                # Nucleus: keep the smallest set of tokens whose mass reaches top_p (the top token always stays).
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > options.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            tokens[index] = int(torch.multinomial(probs, 1, generator=row.generator))
        return [int(t) for t in tokens]

    def _advance(self, rows: list[_Row], tokens: list[int], now: float) -> list[LoopEvent]:
        """Append each row's token, stream its text, finish the rows that are done; feed the tokens next."""
        import torch

        events: list[LoopEvent] = []
        for row, token in zip(rows, tokens, strict=True):
            if row.dead:
                continue
            row.token_times.append(now)
            options = row.request.options
            # Only a streamed row or one with stop strings needs its text as it grows (two short decodes a token).
            if row.request.stream or options.stop:
                delta = row.text.push(token)
            else:
                row.text.tokens.append(token)
                delta = ""
            if token in row.eos:
                row.finish = "stop"
            elif options.stop and delta:
                row.stop_at = _stop_index(row.text.text, options.stop, len(row.text.text) - len(delta))
                if row.stop_at is not None:
                    row.finish = "stop"
            if row.finish is None and len(row.generated) >= options.max_new_tokens:
                row.finish = "length"
            context = len(row.request.prompt_ids) + len(row.generated)
            if row.finish is None and self.max_positions is not None and context >= self.max_positions:
                row.finish = "length"
            if row.finish is not None:
                row.dead = True
                done = self._done(row)
                if row.request.stream:
                    events += self._send(row, done.generation.text)
                events.append(done)
            elif row.request.stream:
                events += self._send(row, self._streamable(row))
        fed = torch.tensor([[t] for t in tokens], device=self.loaded.device)
        if rows is self.rows:
            self._next = fed
        else:  # a prefill's rows joined at the end of the batch
            self._next = fed if self._next is None else torch.cat([self._next, fed])
        return events

    def _streamable(self, row: _Row) -> str:
        """The text of a running sequence that can be sent: all of it but what could start a stop string."""
        text = row.text.text
        if row.request.options.stop:
            hold = max(len(stop) for stop in row.request.options.stop) - 1
            text = text[: max(len(row.sent), len(text) - hold)]
        return text

    def _send(self, row: _Row, text: str) -> list[LoopEvent]:
        """The delta from what was sent to ``text`` (the deltas always concatenate to the final text)."""
        if not text.startswith(row.sent) or len(text) == len(row.sent):
            return []  # nothing new (an incremental decode never runs ahead of the final one it is cut from)
        delta = text[len(row.sent) :]
        row.sent = text
        return [TextDelta(row.key, delta, len(row.generated))]

    def _done(self, row: _Row) -> SequenceDone:
        text = _final_text(self.loaded.tokenizer, row)
        times = row.token_times
        generation = Generation(
            text=text,
            prompt_tokens=len(row.request.prompt_ids),
            completion_tokens=len(row.generated),
            finish_reason=row.finish or "length",
        )
        return SequenceDone(
            key=row.key,
            generation=generation,
            queued_s=row.admitted_at - row.added_at,
            first_token_s=times[0] - row.added_at if times else 0.0,
            inter_token_s=tuple(b - a for a, b in itertools.pairwise(times)),
            prefill_tokens=row.prefill_tokens,
        )

    def _cut_columns(self, width: int) -> None:
        """Drop cache columns from ``width`` on (what a failed forward may have appended)."""
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, :width]
            layer.values = layer.values[:, :, :width]

    # -- housekeeping -------------------------------------------------------------------------------------------

    def _compact(self, *, force: bool = False) -> None:
        """Drop dead rows from the cache (when enough are dead, or ``force``) and columns only padding uses."""
        import torch

        if self._cache is None or self._mask is None:
            return
        dead = sum(1 for row in self.rows if row.dead)
        if not dead or (not force and dead < COMPACT_DEAD_SHARE * len(self.rows)):
            return
        keep = [index for index, row in enumerate(self.rows) if not row.dead]
        if not keep:
            self._cache, self._mask, self._next, self.rows = None, None, None, []
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every remaining row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._mask = mask[:, first:]
        if self._next is not None:
            self._next = self._next.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in recent transformers, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _stop_index(text: str, stops: Sequence[str], searched_to: int) -> int | None:
    """Where the first stop string in ``text`` starts, looking only where a new one could have appeared."""
    return first_stop(text, stops, max(0, searched_to - max(len(stop) for stop in stops) + 1))


def _final_text(tokenizer: Any, row: _Row) -> str:
    """The sequence's text, as a one-shot decode gives it (cut before a stop string)."""
    text = str(tokenizer.decode(row.generated, skip_special_tokens=True))
    if row.stop_at is not None:
        cut = _stop_index(text, row.request.options.stop, 0)
        text = text[:cut] if cut is not None else text[: row.stop_at]
    return text


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """KV-cache bytes one token of one sequence takes: layers x (keys + values) x kv heads x head width."""
    from gpufleet.gpu.units import dtype_bytes

    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return layers * 2 * kv_heads * head_dim * dtype_bytes(dtype)
