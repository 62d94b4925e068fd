"""The local tokenizers generated models ship with, trained here, offline, deterministically.

* :func:`demo_tokenizer`: byte-level BPE (the Llama/GPT-2 family's kind) with the chat template of the demo chat
  model; byte-level, so any text encodes with no unknown tokens.
* :func:`unigram_tokenizer`: a SentencePiece-style Unigram model with XLM-RoBERTa's special tokens and layout
  (``<s> text </s>``, ``<pad>`` = 1), for the XLM-RoBERTa family of embedding models.

Both are trained once per process on :data:`CORPUS`, a few paragraphs of English written for this project; the
training is deterministic, so every process (and every machine) builds the same vocabulary.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from gpufleet.workers.tools.guards import needs_worker_libraries

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


def demo_tokenizer() -> Any:
    """A fresh copy of the demo tokenizer (a ``transformers.PreTrainedTokenizerFast``).

    Trained once per process on :data:`CORPUS`.

    Raises:
        ConfigError: transformers or tokenizers is not installed.
    """
    with needs_worker_libraries("the demo tokenizer"):
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


# XLM-RoBERTa's special tokens, in its order (pad = 1 is the position embeddings' padding index).
UNIGRAM_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
UNIGRAM_VOCAB_SIZE = 800
UNIGRAM_MAX_LENGTH = 512


def unigram_tokenizer() -> Any:
    """A fresh copy of the local Unigram tokenizer, laid out as XLM-RoBERTa's (``PreTrainedTokenizerFast``).

    Metaspace pre-tokenization (``▁`` marks word starts), ``<s> A </s>`` and ``<s> A </s></s> B </s>`` templates,
    at most :data:`UNIGRAM_MAX_LENGTH` tokens.

    Raises:
        ConfigError: transformers or tokenizers is not installed.
    """
    with needs_worker_libraries("the Unigram tokenizer"):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tokenizer_class: Any = PreTrainedTokenizerFast  # transformers' constructor is untyped
        bos, pad, eos, unk, mask = UNIGRAM_SPECIAL_TOKENS
        return tokenizer_class(
            tokenizer_object=Tokenizer.from_str(_trained_unigram_json()),
            bos_token=bos,
            eos_token=eos,
            sep_token=eos,
            cls_token=bos,
            pad_token=pad,
            unk_token=unk,
            mask_token=mask,
            model_max_length=UNIGRAM_MAX_LENGTH,
        )


def save_tokenizer(directory: Path) -> None:
    """Write the demo tokenizer's files (``tokenizer.json``, ``tokenizer_config.json`` …) into ``directory``.

    Raises:
        ConfigError: transformers or tokenizers is not installed.
    """
    demo_tokenizer().save_pretrained(str(directory))


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


@functools.lru_cache(maxsize=1)
def _trained_unigram_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=UNIGRAM_VOCAB_SIZE,
        special_tokens=list(UNIGRAM_SPECIAL_TOKENS),
        unk_token=UNIGRAM_SPECIAL_TOKENS[3],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    bos, _, eos, _, _ = UNIGRAM_SPECIAL_TOKENS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
    )
    return tokenizer.to_str()
