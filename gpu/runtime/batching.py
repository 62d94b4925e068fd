"""Batched inference: several jobs' texts in one embedding forward, several prompts in one generation.

The worker's batcher (``gpufleet.workers.parent.batching``) gathers queued jobs for one model; these functions run them
together and hand each job back its own answer. A job's answer does not depend on what it was batched with: embeddings
equal the job run alone within float tolerance, greedy generations are token-identical, and a sampled
generation with a seed draws from its own generator, so the same seed gives the same text in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import ForwardError
from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.runtime.model import Generation, LoadedModel, ModelKind, Pooling
from gpufleet.gpu.runtime.options import GenerateOptions

if TYPE_CHECKING:
    import torch

GENERATE_ADVICE = (
    "check the prompt or messages and the generation settings (max_new_tokens, temperature, top_p); if every "
    "request fails, unload the model so the next job reloads it"
)


# ------------------------------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbedJob:
    """One job's share of an embedding batch."""

    texts: Sequence[str]
    normalize: bool = True
    # Each vector as float32 little-endian bytes (``Embedded.packed``) instead of a list of floats: a quarter of the
    # size of its JSON and no float formatting or parsing on either side of the queue.
    packed: bool = False


@dataclass(frozen=True)
class Embedded:
    """One job's answer from an embedding batch: a vector per text (as floats, or packed), and the tokens its texts
    came to."""

    vectors: list[list[float]]  # empty when the job asked for packed vectors
    packed: list[bytes]  # float32 little-endian, one per text; empty unless asked for
    # Per text, special tokens included, after truncation: what the model read (OpenAI's prompt_tokens).
    text_tokens: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.text_tokens)


def embed_batch(loaded: LoadedModel, jobs: Sequence[EmbedJob], *, max_batch_tokens: int = 16384) -> list[Embedded]:
    """Embed every job's texts in as few forwards as the token budget allows; one answer per job.

    Texts are sorted by length before they are cut into forwards, so short texts are not padded to long ones.

    Args:
        loaded: an embedding model.
        jobs: the jobs, each with its texts and whether to normalize.
        max_batch_tokens: padded tokens per forward (rows x longest row); a single longer text runs alone.

    Raises:
        ForwardError: the model is not an embedding model, or tokenizing or a forward failed.
        DeviceOutOfMemoryError: the device ran out of memory during a forward.
    """
    import torch

    from gpufleet.gpu.runtime.oom import translate_model_errors

    if loaded.kind is not ModelKind.EMBEDDING:
        raise ForwardError(
            f"model {loaded.model_id!r} is a {loaded.kind.value} model; use fleet.generate, or embed with an "
            "encoder such as sentence-transformers/all-MiniLM-L6-v2"
        )
    texts = [text for job in jobs for text in job.texts]
    advice = (
        "check the texts are non-empty strings; if every request fails, unload the model so the next job reloads it"
    )
    with translate_model_errors(loaded.model_id, f"embedding {len(texts)} texts", advice), torch.inference_mode():
        encoded = loaded.tokenizer(texts, truncation=True)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        rows: list[Any] = [None] * len(texts)
        for chunk in _length_chunks(lengths, max_batch_tokens):
            features = {key: [encoded[key][i] for i in chunk] for key in encoded}
            batch = loaded.tokenizer.pad(features, return_tensors="pt").to(loaded.device)
            pooled = pool_states(loaded.module(**batch).last_hidden_state, batch["attention_mask"], loaded.pooling)
            for row, index in zip(pooled.float().cpu(), chunk, strict=True):
                rows[index] = row
    answers: list[Embedded] = []
    start = 0
    for job in jobs:
        end = start + len(job.texts)
        block = torch.stack(rows[start:end])
        if job.normalize:
            block = torch.nn.functional.normalize(block, p=2, dim=1)
        if job.packed:
            little = block.to(torch.float32).numpy().astype("<f4", copy=False)
            answers.append(Embedded([], [row.tobytes() for row in little], lengths[start:end]))
        else:
            answers.append(Embedded(block.tolist(), [], lengths[start:end]))
        start = end
    return answers


# A forward's texts may be this much longer than its shortest before a new forward starts (once it has
# MIN_CHUNK_ROWS): every padded token is computed, so 256 one-sentence texts of 9 to 17 tokens padded to 17 cost
# ~40 % more than the same texts in a few forwards of like lengths.
MAX_LENGTH_SPREAD = 1.25
MIN_CHUNK_ROWS = 16


def _length_chunks(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into forwards, shortest first, each under ``max_batch_tokens`` once padded and, past
    :data:`MIN_CHUNK_ROWS` rows, of lengths within :data:`MAX_LENGTH_SPREAD` of each other (little padding)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending, so the newest index is the longest: the padded size is rows x its length.
        over_budget = (len(current) + 1) * lengths[index] > max_batch_tokens
        spread = len(current) >= MIN_CHUNK_ROWS and lengths[index] > MAX_LENGTH_SPREAD * lengths[current[0]]
        if current and (over_budget or spread):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def pool_states(states: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per row from token states, as sentence-transformers pools them (mean, CLS or last token)."""
    import torch

    if pooling is Pooling.CLS:
        return states[:, 0]
    if pooling is Pooling.LAST:
        # Right padding: the last real token of each row sits at its length - 1.
        last = attention_mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


# ------------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class EncodedPrompt:
    """A job's prompt as token ids, checked against the model's context (see :func:`encode_prompt`)."""

    job: GenerateOptions
    input_ids: list[int]


def encode_prompt(loaded: LoadedModel, job: GenerateOptions) -> EncodedPrompt:
    """Tokenize one job's prompt or chat messages and check it fits the model's context.

    Done per job before batching, so a job with a bad prompt fails alone and never enters a batch.

    Raises:
        ForwardError: not a causal LM, no chat template for messages, over the context, or tokenizing failed.
    """
    from gpufleet.gpu.runtime.oom import translate_model_errors

    if loaded.kind is not ModelKind.CAUSAL_LM:
        raise ForwardError(f"model {loaded.model_id!r} is an {loaded.kind.value} model; use fleet.embed for it")
    tokenizer = loaded.tokenizer
    if job.messages is not None and not getattr(tokenizer, "chat_template", None):
        raise ForwardError(f"model {loaded.model_id!r} has no chat template; send 'prompt' instead of 'messages'")
    with translate_model_errors(loaded.model_id, "tokenizing the prompt", GENERATE_ADVICE):
        if job.messages is not None:
            text = tokenizer.apply_chat_template(list(job.messages), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(job.prompt)["input_ids"]
    config = loaded.module.config
    # A multimodal model's context is its text model's.
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_positions is not None and len(ids) + job.max_new_tokens > max_positions:
        raise ForwardError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({job.max_new_tokens}) exceeds the model's context of "
            f"{max_positions} tokens; shorten the prompt or lower max_new_tokens"
        )
    return EncodedPrompt(job, [int(i) for i in ids])


def generate_batch(loaded: LoadedModel, prompts: Sequence[EncodedPrompt]) -> list[Generation]:
    """Generate for several prompts in one left-padded ``generate`` call; one :class:`Generation` per prompt.

    transformers decodes greedily; rows that sample are drawn by :class:`_RowSampler` (each with its own
    temperature, top_p and seeded generator) and forced as the row's argmax, so greedy and sampled jobs share a
    batch. Each row stops at its own ``max_new_tokens`` or end-of-sequence token.

    Raises:
        ForwardError: generation or decoding failed.
        DeviceOutOfMemoryError: the device ran out of memory.
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from gpufleet.gpu.runtime.oom import translate_model_errors

    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p.input_ids) for p in prompts)
    # Left padding: every row's next token is at the same position, which is what batched decoding needs.
    input_ids = torch.tensor([[pad_id] * (width - len(p.input_ids)) + p.input_ids for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    jobs = [p.job for p in prompts]
    longest = max(job.max_new_tokens for job in jobs)
    with (
        translate_model_errors(
            loaded.model_id, f"generating up to {longest} tokens for {len(jobs)} prompts", GENERATE_ADVICE
        ),
        torch.inference_mode(),
    ):
        output = loaded.module.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=attention_mask.to(loaded.device),
            pad_token_id=pad_id,
            max_new_tokens=longest,
            do_sample=False,
            # Clear the sampling knobs a checkpoint's generation_config may carry: sampling is _RowSampler's.
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([_RowSampler(jobs, loaded.device)]),
            stopping_criteria=StoppingCriteriaList([_RowLimits(jobs, width)]),
        )
        new_tokens = output[:, width:].cpu().tolist()
    eos_ids = loaded.module.generation_config.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    results = []
    with translate_model_errors(loaded.model_id, "decoding the generated tokens", GENERATE_ADVICE):
        for prompt, row in zip(prompts, new_tokens, strict=True):
            tokens, finish = _trim(row[: prompt.job.max_new_tokens], eos_set, prompt.job.max_new_tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if prompt.job.stop and first_stop(text, prompt.job.stop) is not None:
                tokens, text = _cut_at_stop(tokenizer, tokens, prompt.job.stop)
                finish = "stop"
            results.append(
                Generation(
                    text=text,
                    prompt_tokens=len(prompt.input_ids),
                    completion_tokens=len(tokens),
                    finish_reason=finish,
                )
            )
    return results


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first of the ``stop`` strings starts in ``text`` (searching from ``start``), or None."""
    found = [i for stop in stops if stop and (i := text.find(stop, start)) != -1]
    return min(found) if found else None


def _cut_at_stop(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> tuple[list[int], str]:
    """The fewest tokens whose text holds a stop string, and that text cut before it: what a decode loop that
    checks after every token would have produced (found by bisection: holding a stop only grows with length)."""
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if first_stop(tokenizer.decode(tokens[:middle], skip_special_tokens=True), stops) is None:
            low = middle + 1
        else:
            high = middle
    text = tokenizer.decode(tokens[:low], skip_special_tokens=True)
    cut = first_stop(text, stops)
    return tokens[:low], text[:cut] if cut is not None else text


def _trim(tokens: list[int], eos_set: set[int], max_new_tokens: int) -> tuple[list[int], FinishReason]:
    """A row's own tokens: up to and including its first end-of-sequence token (padding follows it)."""
    for position, token in enumerate(tokens):
        if token in eos_set:
            return tokens[: position + 1], "stop"
    return tokens, "length" if len(tokens) >= max_new_tokens else "stop"


class _RowSampler:
    """A logits processor that samples the rows whose job asks for it, each from its own seeded generator.

    The sampled token gets the only finite score, so transformers' greedy step picks it; greedy rows pass through.
    """

    def __init__(self, jobs: Sequence[GenerateOptions], device: str) -> None:
        import torch

        self.rows: list[tuple[int, float, float, torch.Generator]] = []
        for row, job in enumerate(jobs):
            if job.temperature > 0:
                generator = torch.Generator(device=device)
                if job.seed is not None:
                    generator.manual_seed(job.seed)
                else:
                    generator.seed()
                self.rows.append((row, float(job.temperature), float(job.top_p), generator))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        for row, temperature, top_p, generator in self.rows:
            probs = torch.softmax(scores[row].float() / temperature, dim=-1)
            if top_p < 1.0:
                # Nucleus: keep the smallest set of tokens whose mass reaches top_p (the top token always stays).
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            token = torch.multinomial(probs, 1, generator=generator)
            forced = torch.full_like(scores[row], float("-inf"))
            forced[token] = 0.0
            scores[row] = forced
        return scores


class _RowLimits:
    """A stopping criterion: each row is done at its own ``max_new_tokens`` (transformers stops a row per flag)."""

    def __init__(self, jobs: Sequence[GenerateOptions], prompt_width: int) -> None:
        self.limits = [job.max_new_tokens for job in jobs]
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        import torch

        generated = input_ids.shape[1] - self.prompt_width
        return torch.tensor([generated >= limit for limit in self.limits], device=input_ids.device)
