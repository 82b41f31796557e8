"""The CLIP tokenizer gives the ids of `transformers.CLIPTokenizer` (transformers 5: tokenizers-backed).

The oracle is called as the diffusers pipelines call it: `padding="max_length", truncation=True, max_length=77`.
Tests on the tiny fixture vocabulary run anywhere; the real 49,408-token vocabulary comes from ../shared.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import mlx_sdxs
from mlx_sdxs.errors import WeightsError
from mlx_sdxs.tokenizer import CLIPTokenizer, _clip_pattern, load_tokenizer

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

TINY = Path(__file__).parent / "fixtures" / "clip-tiny-tokenizer"


def _added(content: str, normalized: bool) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


# tokenizer_config.json as SD-1.5 and SD-2.1 checkpoints ship it (pad "<|endoftext|>" vs "!").
SD1_CONFIG = {
    "bos_token": _added("<|startoftext|>", True),
    "eos_token": _added("<|endoftext|>", True),
    "unk_token": _added("<|endoftext|>", True),
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "model_max_length": 77,
    "tokenizer_class": "CLIPTokenizer",
}
SD2_CONFIG = {**SD1_CONFIG, "pad_token": "!"}
# As newer transformers save it: `added_tokens_decoder` holds the flags, special_tokens_map.json is then ignored.
SAVED_BY_V5_CONFIG = {
    "added_tokens_decoder": {
        "0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True},
    },
    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!",
}
# (tokenizer_config.json, special_tokens_map.json) pairs.
CONFIGS = {
    "no-config": (None, None),
    "sd1": (SD1_CONFIG, None),
    "sd2": (SD2_CONFIG, None),
    "sd2-map-only": (None, {"pad_token": "!", "bos_token": _added("<|startoftext|>", True)}),
    "map-overrides-config": (SD2_CONFIG, {"pad_token": "<|endoftext|>", "eos_token": _added("<|endoftext|>", True)}),
    "added-tokens-decoder": (SAVED_BY_V5_CONFIG, {"pad_token": "<|endoftext|>"}),
}

_WORDS = [
    "a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "cyberpunk", "city", "at", "night",
    "watercolor", "painting", "portrait", "highly", "detailed", "8k", "trending", "artstation", "Van", "Gogh",
    "ISO", "f/1.8", "35mm", "café", "naïve", "Zürich", "São", "Paulo", "東京", "夜景", "고양이", "кот", "Ελλάδα",
    "ΟΔΟΣ", "İstanbul", "straße", "ﬁne", "🙂", "👩‍🚀", "🇫🇷", "x\u0301", "e\u0301", "Å", "Ⅻ", "x²", "½", "٣",
    "१२३", "C++", "e-mail", "don't", "it's", "we're", "I'LL", "they've", "I'm", "he'd", "rock'n'roll", "&amp;",
    "&lt;b&gt;", "<b>", "#hashtag", "@user", "(masterpiece:1.2)", "[cat|dog]", "{a,b}", "50%", "$100", "3.14159",
    "1,000,000", "--ar", "16:9", "...", "!!!", "?!", "—", "“quoted”", "«guillemets»", "under_score", "snake_case",
    "CamelCase", "ALLCAPS", "\u200b", "\u00ad", "\x1c", "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s",
]
_SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", " \n\t ", ", ", ",", "\u3000", "\xa0", "", ". "]

EDGE_PROMPTS = [
    "",
    " ",
    "\t\n  \r\n",
    "!",
    "!!!",
    "!!! !!! !",
    "hello!!! world",
    "<|endoftext|>",
    "<|endoftext|>!!",
    "a<|startoftext|>b",
    "A <|ENDOFTEXT|> b!",
    "ΟΔΟΣ Σ σ ς",
    "'s 't 're 've 'm 'll 'd ''s",
    "word " * 100,
    "supercalifragilisticexpialidocious " * 20,
    "a" * 300,
    "🙂" * 80,
    "1234567890" * 10,
]


def generated_prompts(count: int, seed: int = 0) -> list[str]:
    """Deterministic prompts mixing words, unicode, punctuation and whitespace runs of every kind above."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pieces = [rng.choice(_WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 40]))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(_SEPARATORS) + piece
        if rng.random() < 0.2:
            text = text.upper()
        if rng.random() < 0.2:
            text = unicodedata.normalize("NFD", text)
        prompts.append(text)
    return prompts


def tokenizer_folder(vocab_dir: Path, tmp_path: Path, config: dict | None, special_map: dict | None = None) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / name)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


def oracle_ids(folder: Path, prompts: list[str]) -> list[tuple[str, np.ndarray, list[int]]]:
    """Per transformers tokenizer class (in transformers 5 CLIPTokenizerFast is CLIPTokenizer): the padded ids,
    and each prompt's token count without bos/eos."""
    transformers = pytest.importorskip("transformers")
    classes = {transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)}
    results = []
    for oracle_class in classes:
        oracle = oracle_class.from_pretrained(folder)
        padded = oracle(prompts, padding="max_length", truncation=True, max_length=77)["input_ids"]
        lengths = [len(ids) for ids in oracle(prompts, add_special_tokens=False)["input_ids"]]
        results.append((oracle_class.__name__, np.array(padded, dtype=np.int32), lengths))
    return results


def assert_same_ids(folder: Path, prompts: list[str], tokenizer: CLIPTokenizer | None = None) -> None:
    """`tokenizer` (default: mlx-sdxs's load of `folder`) gives transformers' ids for `folder` on every prompt."""
    tokenizer = tokenizer or load_tokenizer(folder)
    actual = tokenizer(prompts)
    assert actual.dtype == np.int32 and actual.shape == (len(prompts), 77)
    for oracle_name, expected, lengths in oracle_ids(folder, prompts):
        mismatched = [i for i in range(len(prompts)) if not np.array_equal(actual[i], expected[i])]
        assert not mismatched, f"differs from transformers.{oracle_name}:\n" + "\n".join(
            f"{prompts[i]!r}:\n  mlx-sdxs     {actual[i].tolist()}\n  transformers {expected[i].tolist()}"
            for i in mismatched[:5]
        )
        assert [len(tokenizer.encode(p)) for p in prompts] == lengths
        assert [tokenizer.is_truncated(p) for p in prompts] == [n > 75 for n in lengths]


# ---- runs without ../shared: the tiny fixture vocabulary -------------------------------------------------


# SAVED_BY_V5_CONFIG's added_tokens_decoder ids belong to the real vocabulary.
TINY_CONFIGS = {name: files for name, files in CONFIGS.items() if files[0] is not SAVED_BY_V5_CONFIG}


@pytest.mark.parametrize("config, special_map", TINY_CONFIGS.values(), ids=TINY_CONFIGS.keys())
def test_tiny_vocab_matches_transformers(tmp_path, config, special_map):
    folder = tokenizer_folder(TINY, tmp_path, config, special_map)
    assert_same_ids(folder, EDGE_PROMPTS + generated_prompts(120, seed=1))


def test_unknown_symbols_become_unk_like_transformers(tmp_path):
    # Drop a byte symbol no merge uses; its byte must then come out as one unk id per occurrence.
    folder = tokenizer_folder(TINY, tmp_path, None)
    vocab = json.loads((folder / "vocab.json").read_text())
    merged_symbols = set((folder / "merges.txt").read_text().split())
    dropped = next(s for s in vocab if len(s) == 1 and s not in merged_symbols and s + "</w>" not in merged_symbols and s.isalpha())
    del vocab[dropped], vocab[dropped + "</w>"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    byte = next(b for b in range(256) if chr(b) == dropped or chr(256 + b) == dropped)  # its GPT-2 byte code
    text = bytes([byte]).decode("latin-1")
    assert_same_ids(folder, [f"a{text}b {text}{text} {text}", text])


def test_split_pattern_classes_match_unicode_categories():
    """Letters are one run, numbers one char each, other symbols one run, whitespace dropped — for every code point."""
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    category = {c: unicodedata.category(c)[0] for c in chars}
    letters = "".join(c for c in chars if category[c] == "L")
    numbers = "".join(c for c in chars if category[c] == "N")
    # White_Space per Unicode (what `\s` means in tokenizers' regex engine); U+001C–U+001F are not in it.
    whitespace = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
    others = "".join(c for c in chars if category[c] not in "LN" and c not in whitespace and c not in "'<")
    pattern = _clip_pattern()
    assert pattern.findall(letters) == [letters]
    assert pattern.findall(numbers) == list(numbers)
    assert pattern.findall(others) == [others]
    assert pattern.findall(whitespace) == []
    assert pattern.findall("<|endoftext|>x<|startoftext|>") == ["<|endoftext|>", "x", "<|startoftext|>"]


def test_padding_truncation_and_batch():
    tokenizer = load_tokenizer(TINY)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids = tokenizer(["the cat", "the " * 200])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    words = tokenizer.encode("the cat")
    assert ids[0, : len(words) + 1].tolist() == [bos, *words] and (ids[0, len(words) + 1 :] == eos).all()  # pad = eos
    assert ids[1, 0] == bos and ids[1, -1] == eos and (ids[1, 1:-1] != eos).all()
    assert tokenizer.is_truncated("the " * 200) and not tokenizer.is_truncated("the cat")
    assert np.array_equal(tokenizer("the cat"), ids[:1])


def test_bpe_cache_reuses_words():
    tokenizer = load_tokenizer(TINY)
    tokenizer("the the the")
    info = tokenizer._bpe.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_pad_token_from_special_tokens_map(tmp_path):
    folder = tokenizer_folder(TINY, tmp_path, None)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_id == tokenizer.vocab["!"]
    assert tokenizer("the")[0, :3].tolist() == [tokenizer.bos_id, *tokenizer.encode("the"), tokenizer.eos_id]
    assert (tokenizer("the")[0, 3:] == tokenizer.pad_id).all()


def test_load_tokenizer_accepts_a_checkpoint_root(tmp_path):
    tokenizer_folder(TINY, tmp_path, SD2_CONFIG)
    tokenizer = mlx_sdxs.load_tokenizer(tmp_path)
    assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.pad_id == tokenizer.vocab["!"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "vocab.json").unlink(), "vocab.json: missing"),
        (lambda f: (f / "merges.txt").unlink(), "merges.txt: missing"),
        (lambda f: (f / "vocab.json").write_text("{not json"), "vocab.json: not valid JSON"),
        (lambda f: (f / "vocab.json").write_text("[1, 2]"), "vocab.json: expected a JSON object"),
        (lambda f: (f / "merges.txt").write_text("#version: 0.2\nt h e\n"), "merges.txt: line 2"),
        (lambda f: (f / "merges.txt").write_text("#version: 0.2\nt qqqq\n"), "'qqqq', which is not in the vocabulary"),
        (lambda f: (f / "merges.txt").write_bytes(b"\xff\xfe"), "merges.txt: not UTF-8"),
        (lambda f: (f / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}'), "pad token '<pad>'"),
        (lambda f: (f / "tokenizer_config.json").write_text('{"pad_token": 3}'), "special token 3"),
        (
            lambda f: (f / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"9": {"content": "<x>"}}}'),
            "added token '<x>' is not in the vocabulary",
        ),
    ],
)
def test_corrupt_folders_raise_weights_error(tmp_path, damage, message):
    folder = tokenizer_folder(TINY, tmp_path, None)
    damage(folder)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(")):
        load_tokenizer(folder)


# ---- the real CLIP vocabulary (../shared) -------------------------------------------------------------------


@pytest.mark.parametrize("config, special_map", CONFIGS.values(), ids=CONFIGS.keys())
def test_real_vocab_matches_transformers(shared_dir, tmp_path, config, special_map):
    folder = tokenizer_folder(shared_dir / "data" / "clip-tokenizer", tmp_path, config, special_map)
    assert_same_ids(folder, EDGE_PROMPTS + generated_prompts(240))
