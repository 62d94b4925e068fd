"""The local tokenizer: special tokens, chat template, byte-level round trips, deterministic training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpufleet.workers.tools.tokenizer import demo_tokenizer, save_tokenizer


def test_tokenizer_special_tokens_and_chat_template() -> None:
    tokenizer = demo_tokenizer()
    assert 1000 <= len(tokenizer) <= 2000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "<|end|>",
        "<pad>",
        "<unk>",
    )
    ids = tokenizer("Hello world, how are you?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, how are you?"
    # Byte-level: text the corpus never saw still round-trips, with no unknown tokens.
    odd = "Grüße 東京 🚀"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_tokenizer_training_is_deterministic() -> None:
    code = (
        "import hashlib\n"
        "from gpufleet.workers.tools.tokenizer import _trained_tokenizer_json\n"
        "print(hashlib.sha256(_trained_tokenizer_json().encode()).hexdigest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=Path(__file__).parents[4]
        ).stdout
        for _ in range(2)
    }
    assert len(digests) == 1


def test_saved_tokenizer_loads_back_the_same(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Tell me a story about a cat."
    assert loaded(text)["input_ids"] == demo_tokenizer()(text)["input_ids"]
    assert loaded.chat_template == demo_tokenizer().chat_template
