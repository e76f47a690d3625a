"""phicore.tokenizer against transformers.AutoTokenizer on the real Phi tokenizer folders.

The real folders live in the sibling checkout ``../shared/models`` (never copied into this
repository); tests that need them skip, with the reason, when it is absent. transformers is a
test-only dependency, imported here and never by phicore.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from phicore.tokenizer import Tokenizer, load_tokenizer

MODELS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models"
MODEL_FOLDERS = ("phi-2", "phi-3-mini-4k-instruct", "phi-3.5-mini-instruct")
CHAT_MODEL_FOLDERS = ("phi-3-mini-4k-instruct", "phi-3.5-mini-instruct")

needs_models = pytest.mark.skipif(
    not MODELS_DIR.is_dir(), reason=f"real model folders not found at {MODELS_DIR}"
)

FIXED_TEXTS = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\t",
    "\n\n",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  two leading spaces",
    "two trailing spaces  ",
    "runs    of     spaces      here",
    "tabs\tand\t\ttabs\t\t\tand\t\t\t\t\t\t\t\t\t\tmore",
    "new\nlines\n\n\nmany\n",
    "windows\r\nline\r\nendings",
    "日本語のテキストです。",
    "中文测试，标点符号。",
    "한국어 텍스트 입니다",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 🇫🇷",
    "accents: café naïve résumé Ångström façade",
    "Ελληνικά και кириллица и عربى",
    "math ∑∫√∞ ≤ ≥ ≠ ± × ÷",
    "combining e\u0301 a\u0308 vs é ä",
    "zero\u200bwidth and\u00a0nbsp",
    "control \x00\x01\x07\x7f characters",
    "def square(x):\n    return x ** 2\n",
    "class A:\n\tdef f(self):\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) {\n        sum += a[i];\n}\n",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    'json = {"key": [1, 2.5, null, true], "s": "x\\ny"}',
    "SELECT * FROM t WHERE a >= 10 AND b <> 'x';",
    "numbers 0 1 12 123 1234 12345 123456 3.14159 -42 1e-9 0x1F 007",
    "1,000,000.00 and 99.9% of $5",
    "can't won't it's I'm we've they're y'all",
    "Hello , world . How ? ! ' quote ' end",
    "▁ already a metaspace ▁▁ char",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    " <|endoftext|> ",
    "<|endoftext|><|endoftext|>",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n",
    "<|system|>You are helpful.<|end|>\n<|user|>hi<|end|>",
    "<s>",
    "<s> start of text",
    "</s>",
    "end </s> tail",
    "<unk> unknown",
    "<|placeholder1|><|placeholder6|>",
    "<|end|>   spaces after end",
    "spaces before end   <|end|>",
    "<|end|>\n\nnewlines after end",
    "<|user|> <|assistant|> <|end|>",
    "<|notatoken|> <|end",
    "Instruct: Write a haiku about the sea.\nOutput:",
    "A" * 300,
    "word " * 120,
]

FRAGMENTS = [
    "hello", "Hello", "world", "the", "quick brown fox", "naïve", "über", "日本", "中文", "😀",
    "🎉", "x = 1", "return", "def", "{", "}", "(", ")", "'", '"', "42", "3.14", "-7", "...",
    "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<s>", "</s>",
    "<unk>", "can't", "I'm", ",", ".", "?", "!", "\\", "#", "@user", "http://a.b/c?d=e",
]
SEPARATORS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", "\t\t", " \n", "\n ", "    "]


def generated_texts(count: int = 260, seed: int = 1234) -> list[str]:
    """Seeded random mixes of words, symbols, special tokens and whitespace."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 7)):
            pieces.append(rng.choice(SEPARATORS) if rng.random() < 0.7 else "")
            pieces.append(rng.choice(FRAGMENTS))
        pieces.append(rng.choice(SEPARATORS) if rng.random() < 0.3 else "")
        texts.append("".join(pieces))
    return texts


ALL_TEXTS = FIXED_TEXTS + generated_texts()

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語 please 😀"},
    ],
    [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "code:\n```python\nprint('hi')\n```\n"},
        {"role": "user", "content": "Thanks\n\nbye"},
        {"role": "assistant", "content": "Bye <|endoftext|> now"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system prompt"}],
]


def _first_mismatches(pairs, limit: int = 5) -> list:
    return [p for p in pairs if p[1] != p[2]][:limit]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def transformers_module():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def real_tokenizers(transformers_module):
    """Loads each real folder once per module, with ours and transformers', on first use."""
    if not MODELS_DIR.is_dir():
        pytest.skip(f"real model folders not found at {MODELS_DIR}")
    loaded = {}

    def pair(name):
        if name not in loaded:
            folder = MODELS_DIR / name
            theirs = transformers_module.AutoTokenizer.from_pretrained(str(folder))
            loaded[name] = (load_tokenizer(folder), theirs)
        return loaded[name]

    return pair


@pytest.fixture(scope="module")
def our_tokenizers():
    if not MODELS_DIR.is_dir():
        pytest.skip(f"real model folders not found at {MODELS_DIR}")
    return {name: load_tokenizer(MODELS_DIR / name) for name in MODEL_FOLDERS}


# ---------------------------------------------------------------- parity with transformers


@needs_models
def test_text_corpus_is_large_and_deterministic():
    assert len(ALL_TEXTS) >= 300
    assert generated_texts() == generated_texts()


@needs_models
@pytest.mark.parametrize("name", MODEL_FOLDERS)
def test_encode_matches_transformers(real_tokenizers, name):
    ours, theirs = real_tokenizers(name)
    with_special = [(t, ours.encode(t), theirs(t)["input_ids"]) for t in ALL_TEXTS]
    without = [
        (t, ours.encode(t, add_special_tokens=False), theirs.encode(t, add_special_tokens=False))
        for t in ALL_TEXTS
    ]
    assert not _first_mismatches(with_special), name
    assert not _first_mismatches(without), name
    assert ours.encode_batch(ALL_TEXTS) == [ids for _, ids, _ in with_special]


@needs_models
@pytest.mark.parametrize("name", MODEL_FOLDERS)
def test_decode_matches_transformers(real_tokenizers, name):
    ours, theirs = real_tokenizers(name)
    rng = random.Random(99)
    id_lists = [ours.encode(t) for t in ALL_TEXTS]
    id_lists += [ours.special_token_ids, [ours.eos_token_id] * 3]
    # random ids, including byte-fallback pieces that do not form valid UTF-8 on their own
    id_lists += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 24))] for _ in range(60)]
    for skip in (False, True):
        pairs = [
            (ids, ours.decode(ids, skip_special_tokens=skip), theirs.decode(ids, skip_special_tokens=skip))
            for ids in id_lists
        ]
        assert not _first_mismatches(pairs), (name, skip)


@needs_models
@pytest.mark.parametrize("name", MODEL_FOLDERS)
def test_named_tokens_match_transformers(real_tokenizers, name):
    ours, theirs = real_tokenizers(name)
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.unk_token_id == theirs.unk_token_id
    expected_pad = theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id
    assert ours.pad_token_id == expected_pad
    assert set(theirs.all_special_ids) <= set(ours.special_token_ids)
    assert ours.add_bos_token == (theirs("a")["input_ids"][:1] == [theirs.bos_token_id])
    assert ours.special_tokens_map == theirs.special_tokens_map


@needs_models
@pytest.mark.parametrize("name", CHAT_MODEL_FOLDERS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(real_tokenizers, name, add_generation_prompt):
    ours, theirs = real_tokenizers(name)
    for messages in CONVERSATIONS:
        expected_text = theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        expected_ids = theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert text == expected_text
        assert ids == list(expected_ids)


@needs_models
@pytest.mark.parametrize("name", MODEL_FOLDERS)
def test_save_round_trip(real_tokenizers, transformers_module, tmp_path, name):
    ours, _ = real_tokenizers(name)
    ours.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    theirs_reloaded = transformers_module.AutoTokenizer.from_pretrained(str(tmp_path))
    sample = ALL_TEXTS[::3]
    for text in sample:
        expected = ours.encode(text)
        assert reloaded.encode(text) == expected, text
        assert theirs_reloaded(text)["input_ids"] == expected, text
        assert theirs_reloaded.decode(expected) == ours.decode(expected)
    assert reloaded.chat_template == ours.chat_template
    assert reloaded.special_tokens_map == ours.special_tokens_map
    assert reloaded.special_token_ids == ours.special_token_ids
    assert reloaded.pad_token_id == ours.pad_token_id
    assert len(theirs_reloaded) == ours.vocab_size
    if ours.chat_template is not None:
        messages = CONVERSATIONS[2]
        expected = ours.apply_chat_template(messages)
        assert theirs_reloaded.apply_chat_template(messages, tokenize=False) == expected


# ---------------------------------------------------------------------- Phi-specific facts


@needs_models
def test_phi3_stop_ids_include_end_and_endoftext(our_tokenizers):
    for name in CHAT_MODEL_FOLDERS:
        tokenizer = our_tokenizers[name]
        assert {32000, 32007} <= set(tokenizer.stop_token_ids), name
        assert tokenizer.stop_token_ids == sorted(set(tokenizer.stop_token_ids))
        assert tokenizer.token_to_id("<|end|>") == 32007
        assert tokenizer.token_to_id("<|user|>") == 32010


@needs_models
def test_phi2_pad_falls_back_to_eos_and_has_no_chat_template(our_tokenizers):
    phi2 = our_tokenizers["phi-2"]
    assert phi2.pad_token is None
    assert phi2.pad_token_id == phi2.eos_token_id == 50256
    assert phi2.stop_token_ids == [50256]
    assert phi2.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        phi2.apply_chat_template([{"role": "user", "content": "hi"}])


@needs_models
def test_bos_handling_follows_tokenizer_json(our_tokenizers):
    """Phi-3-mini-4k declares add_bos_token but its tokenizer.json adds none (as transformers 5)."""
    mini = our_tokenizers["phi-3-mini-4k-instruct"]
    assert mini.config_extras["add_bos_token"] is True
    assert mini.add_bos_token is False
    assert mini.encode("hello")[0] != mini.bos_token_id
    assert mini.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)[0] == 1


# --------------------------------------------------------------------- in-memory and errors


def _tiny_byte_level_backend():
    """A small byte-level BPE trained in code, as another module would build one."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    backend.train_from_iterator(FIXED_TEXTS * 3, trainer)
    return backend


TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_in_memory_tokenizer_adds_bos_and_special_tokens():
    tokenizer = Tokenizer(
        _tiny_byte_level_backend(),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        chat_template=TINY_TEMPLATE,
        add_bos_token=True,
    )
    assert tokenizer.bos_token_id is not None and tokenizer.pad_token_id is not None
    ids = tokenizer.encode("hello world")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.add_bos_token
    assert tokenizer.encode("hello world", add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert tokenizer.decode(ids) == "<s>hello world"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<s><|user|>hi<|end|>\n<|assistant|>"
    assert tokenizer.stop_token_ids == [tokenizer.eos_token_id]


def test_in_memory_tokenizer_save_round_trip(tmp_path, transformers_module):
    tokenizer = Tokenizer(
        _tiny_byte_level_backend(),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        chat_template=TINY_TEMPLATE,
        add_bos_token=True,
    )
    tokenizer.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    theirs = transformers_module.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS[1]
    for text in FIXED_TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text) == theirs(text)["input_ids"], text
    assert reloaded.add_bos_token
    assert reloaded.chat_template == TINY_TEMPLATE
    assert reloaded.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    assert reloaded.pad_token_id == reloaded.eos_token_id


def test_legacy_folder_files_match_transformers(tmp_path, transformers_module):
    """No added_tokens_decoder: special_tokens_map.json dicts, added_tokens.json, chat_template.jinja."""
    _tiny_byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "model_max_length": 64}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    eos = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False}
    special_map = {"eos_token": eos}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<extra>": 400}))
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    ours = load_tokenizer(tmp_path)
    theirs = transformers_module.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["a<extra>b", "hello <extra> world", "<|endoftext|><extra>"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    assert ours.eos_token == "<|endoftext|>" and ours.token_to_id("<extra>") is not None
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    expected = "x<|endoftext|>y<|endoftext|>"
    assert ours.apply_chat_template(messages) == expected
    assert theirs.apply_chat_template(messages, tokenize=False) == expected


def test_chat_template_file_precedence_and_stale_file_on_save(tmp_path):
    """chat_template.jinja beats chat_template.json beats the config; save() keeps a .jinja in step."""
    tokenizer = Tokenizer(_tiny_byte_level_backend(), eos_token="<|endoftext|>", chat_template="config")
    tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == "config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json file"}))
    assert load_tokenizer(tmp_path).chat_template == "json file"
    (tmp_path / "chat_template.jinja").write_text("jinja file")
    assert load_tokenizer(tmp_path).chat_template == "jinja file"
    tokenizer.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == "config"
    assert json.loads((tmp_path / "chat_template.json").read_text()) == {"chat_template": "config"}
    assert load_tokenizer(tmp_path).chat_template == "config"


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as error:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_sentencepiece_only_folder_is_rejected_clearly(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="SentencePiece-only form is not supported"):
        load_tokenizer(tmp_path)


def test_empty_conversation_and_template_helpers():
    tokenizer = Tokenizer(_tiny_byte_level_backend(), eos_token="<|endoftext|>", chat_template=TINY_TEMPLATE)
    with pytest.raises(ValueError, match="empty conversation"):
        tokenizer.apply_chat_template([])
    raising = Tokenizer(
        _tiny_byte_level_backend(),
        chat_template="{{ raise_exception('no system role') }}",
    )
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        raising.apply_chat_template([{"role": "system", "content": "x"}])
    json_template = Tokenizer(
        _tiny_byte_level_backend(), chat_template="{% generation %}{{ messages | tojson }}{% endgeneration %}"
    )
    assert json_template.apply_chat_template([{"role": "user", "content": "é<", "name": None}]) == (
        '[{"role": "user", "content": "é<"}]'
    )
