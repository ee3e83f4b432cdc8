"""The tokenizer.json exported from the real GGUF tokenizes exactly like llama.cpp, token for token."""
from __future__ import annotations

import json
from hashlib import sha256

import pytest
from tokenizers import Tokenizer

from edgellm.converters.gguf_source import read_gguf
from edgellm.converters.hf_writer import build_tokenizer_json, tokenizer_config

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog; it's 3.14159 and I've 1,234,567 reasons.",
    "Français : « Où est l'hôtel ? » — élève, garçon, cœur, naïve, Noël.",
    "Deutsch: Die Größe der Straße ist übermäßig schön. Ärger, Öl, Übung.",
    "中文：我想在苹果公司工作，今天是2024年1月1日。",
    "日本語：こんにちは、世界！カタカナとひらがなと漢字。",
    "العربية: مرحبا بالعالم، كيف حالك؟",
    "Emoji: 🚀🦙✅ 😶\u200d🌫️ 👍🏽 family: 👨\u200d👩\u200d👧",
    "def main(argv):\n    for i in range(10):\n\t\tprint(f\"{i:03d}\")  # comment\n    return {'a': [1, 2]}\n",
    "Numbers 0 1 12 123 1234 12345 3.3 3..3 1e-9 0xFF -42 +7 100%",
    "whitespace   runs\t\ttabs\n\n\nnewlines    \n  trailing   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nBonjour! 你好 🚀<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|><repo_name>edgellm<file_sep>main.py<|im_end|>x<|im_start|>",
    "  leading spaces and 'quotes' \"double\" ''''''``` ......!!!!!!????? I'M 'RE 'D",
]
# convert_hf_to_gguf.py's probe text and the hash it maps to 'smollm' (SmolLM's original tokenizer.json)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ '
          '(multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


@pytest.fixture(scope="module")
def exported(default_model_path, module_tmp):
    """tokenizer.json + tokenizer_config.json built from the GGUF's metadata alone."""
    ckpt = read_gguf(default_model_path)
    out = module_tmp
    (out / "tokenizer.json").write_text(build_tokenizer_json(ckpt.tokenizer), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ckpt.tokenizer, 8192)), encoding="utf-8")
    return out


def test_exported_tokenizer_matches_llama_cpp_token_for_token(exported, llm):
    tok = Tokenizer.from_file(str(exported / "tokenizer.json"))
    for text in [*TEXTS, "\n".join(TEXTS), CHKTXT]:
        want = llm.backend.tokenize(text, add_special=False, parse_special=True)
        assert tok.encode(text, add_special_tokens=False).ids == want, text
        assert tok.decode(want, skip_special_tokens=False) == text


def test_exported_tokenizer_is_the_original_smollm_tokenizer(exported):
    """Same ids as SmolLM's own tokenizer.json on llama.cpp's pre-tokenizer probe text."""
    tok = Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest() == SMOLLM_HASH


def test_transformers_loads_the_exported_tokenizer(exported, llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    text = TEXTS[10] + TEXTS[1]
    assert tok(text)["input_ids"] == llm.backend.tokenize(text, add_special=True, parse_special=True)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == llm.render(messages)
