"""CLIP byte-level BPE tokenizer, standard library + numpy only.

Follows the oracle the pipelines are checked against: `transformers.CLIPTokenizer` of transformers 5,
which is backed by the `tokenizers` library (there is no separate slow class any more). Its pipeline:

1. special ("added") tokens are cut out of the text: those saved with `normalized: false` on the raw
   text, the others after normalisation;
2. normalise: NFC, then lower-case char by char (so no Greek final-sigma rule, unlike `str.lower`);
   whitespace runs need no collapsing because step 3 drops whitespace anyway;
3. split with CLIP's pattern
   `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`,
   keeping only the matches;
4. bytes → printable unicode (GPT-2's table), BPE per word with `</w>` on the last symbol;
5. `<|startoftext|> … <|endoftext|>`, truncate to `max_length`, pad with the pad token.

The vocabulary and merges come from `tokenizer.json` (all that transformers 5 saves) or `vocab.json` +
`merges.txt` (older saves, most Hub checkpoints); the pipeline above is CLIP's whichever file holds them,
as transformers' CLIPTokenizer builds it.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from mlx_sdxs.errors import WeightsError, read_json

MAX_LENGTH = 77
TOKENIZER_JSON = "tokenizer.json"
_TOKENIZER_FILES = f"a CLIP tokenizer folder needs {TOKENIZER_JSON}, or vocab.json and merges.txt"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Unicode White_Space, as `\s` means in the Rust/Oniguruma regexes of `tokenizers`; Python's `\s` also
# matches U+001C–U+001F, which CLIP keeps as symbols.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(chars: list[str]) -> str:
    """A regex character class body for a sorted list of characters, as runs `a-z`."""
    runs: list[list[int]] = []
    for code in map(ord, chars):
        if runs and code == runs[-1][1] + 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in runs)


@functools.cache
def _clip_pattern() -> re.Pattern[str]:
    """CLIP's split pattern in stdlib `re`.

    `[^\\W\\d_]` is exactly \\p{L} ∪ \\p{Nl} ∪ \\p{No} and `\\d` is \\p{Nd}, so the letter and number classes are
    fixed up with the Nl/No characters (Roman numerals, superscripts, fractions…), found once by scanning all
    code points with C-speed regex.
    """
    every_char = "".join(map(chr, range(sys.maxunicode + 1)))
    other_numbers = _char_class([c for c in re.findall(r"[^\W\d_]", every_char) if not c.isalpha()])
    letters = rf"(?:(?![{other_numbers}])[^\W\d_])+"
    number = rf"\d|[{other_numbers}]"
    other = rf"(?:[^\w{_WHITESPACE}]|_)+"  # \w is exactly letters, numbers and "_"
    specials = f"{re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)}"
    return re.compile(rf"{specials}|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{other}")


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _normalize(text: str) -> str:
    # Lower-case per character like Rust's `char::to_lowercase` (str.lower would apply the final-sigma rule).
    return "".join(char.lower() for char in unicodedata.normalize("NFC", text))


class CLIPTokenizer:
    """Prompt(s) → CLIP input ids of shape (B, max_length), identical to `transformers.CLIPTokenizer`."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        added_tokens: dict[str, bool] | None = None,
        max_length: int = MAX_LENGTH,
        where: str = "tokenizer",
    ):
        """`added_tokens` maps each special token's text to whether it is matched after normalisation;
        bos/eos/pad/unk are always added (un-normalised unless listed)."""
        added = {token: False for token in (bos_token, eos_token, unk_token, pad_token)}
        added.update(added_tokens or {})
        roles = {unk_token: "unk", pad_token: "pad", eos_token: "eos", bos_token: "bos"}  # eos names "<|endoftext|>"
        for token in added:
            if token not in vocab:
                raise WeightsError(f"{where}: {roles.get(token, 'added')} token {token!r} is not in the vocabulary")
        for left, right in merges:
            for token in (left, right, left + right):
                if token not in vocab:
                    raise WeightsError(
                        f"{where}: merge {left!r} {right!r} uses {token!r}, which is not in the vocabulary"
                    )
        self.vocab = vocab
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
        self.pad_id, self.unk_id = vocab[pad_token], vocab[unk_token]
        self.max_length = max_length

        self.added_ids = {token: vocab[token] for token in added}
        self.raw_added = self._alternation([t for t, normalized in added.items() if not normalized])
        self.normalized_added = self._alternation([t for t, normalized in added.items() if normalized])
        self._bpe = functools.lru_cache(maxsize=16384)(self._bpe_uncached)

    @staticmethod
    def _alternation(tokens: list[str]) -> re.Pattern[str] | None:
        # Longest first, so the regex's first-match rule gives the leftmost-longest match of `tokenizers`.
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """Read a diffusers/transformers `tokenizer/` folder as transformers 5 does: the vocabulary and merges of
        tokenizer.json when there is one, else of vocab.json + merges.txt; the special tokens of
        tokenizer_config.json / special_tokens_map.json / tokenizer.json's `added_tokens` when present."""
        folder = Path(folder)
        if (folder / TOKENIZER_JSON).is_file():
            vocab, merges, saved_added = _read_tokenizer_json(folder / TOKENIZER_JSON)
        else:
            vocab, merges, saved_added = _read_vocab(folder / "vocab.json"), _read_merges(folder / "merges.txt"), []
        config, special_map = (
            read_json(folder / name, _TOKENIZER_FILES, WeightsError) if (folder / name).is_file() else {}
            for name in ("tokenizer_config.json", "special_tokens_map.json")
        )

        # As transformers 5 reads them: special_tokens_map.json overrides tokenizer_config.json unless the latter
        # has `added_tokens_decoder`, whose entries then override everything (without it, tokenizer.json's
        # `added_tokens` take its place); bos, eos, unk, pad are added in this order and a later entry with the
        # same text wins.
        if "added_tokens_decoder" not in config:
            config = {**config, **special_map, "added_tokens_decoder": dict(enumerate(saved_added))}
        defaults = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
        roles: dict[str, str] = {}
        added: dict[str, bool] = {}
        for role, default in defaults.items():
            value = config.get(role) or default
            text, normalized = _special_token(value, folder)
            roles[role] = text
            added[text] = normalized
        for entry in (config.get("added_tokens_decoder") or {}).values():
            text, normalized = _special_token(entry, folder)
            added[text] = normalized
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or not 2 < max_length <= 1024:
            max_length = MAX_LENGTH  # absent, or transformers' "very large" placeholder
        return cls(vocab, merges, **roles, added_tokens=added, max_length=max_length, where=str(folder))

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """BPE of one pre-tokenised word (already in byte-unicode form) → ids."""
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, sys.maxsize))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # Symbols outside the vocabulary become one unk each (tokenizers' BPE with fuse_unk=False).
        return tuple(self.vocab.get(symbol, self.unk_id) for symbol in symbols)

    def _encode_text(self, text: str) -> list[int]:
        """Ids of a normalised stretch of text that holds no special token."""
        byte_table = byte_to_unicode()
        ids: list[int] = []
        for piece in _clip_pattern().findall(text):
            # The byte-level pre-tokenizer re-splits the literal special tokens into "<|", name, "|>".
            words = ["<|", piece[2:-2], "|>"] if piece in (BOS_TOKEN, EOS_TOKEN) else [piece]
            for word in words:
                ids.extend(self._bpe("".join(byte_table[b] for b in word.encode("utf-8"))))
        return ids

    def _split_added(self, text: str, pattern: re.Pattern[str] | None, encode) -> list[int]:
        """Cut the special tokens matched by `pattern` out of `text`; `encode` the stretches between them."""
        if pattern is None:
            return encode(text)
        ids, start = [], 0
        for match in pattern.finditer(text):
            ids.extend(encode(text[start : match.start()]))
            ids.append(self.added_ids[match.group()])
            start = match.end()
        ids.extend(encode(text[start:]))
        return ids

    def encode(self, prompt: str) -> list[int]:
        """Ids of `prompt` without bos/eos, padding or truncation (len > max_length − 2 means it gets truncated)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")

        def normalized_stretch(stretch: str) -> list[int]:
            return self._split_added(_normalize(stretch), self.normalized_added, self._encode_text)

        return self._split_added(prompt, self.raw_added, normalized_stretch)

    def is_truncated(self, prompt: str) -> bool:
        """Whether `prompt` is longer than the text encoder's window."""
        return self.tokenize(prompt)[1]

    def tokenize(self, prompt: str) -> tuple[np.ndarray, bool]:
        """`self(prompt)` and whether the prompt was truncated to fit, from one encoding."""
        tokens = self.encode(prompt)
        return self._rows([tokens]), len(tokens) > self.max_length - 2

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """(B, max_length) int32 ids: bos, the prompt truncated to max_length − 2 tokens, eos, then pad."""
        return self._rows([self.encode(prompt) for prompt in ([prompts] if isinstance(prompts, str) else prompts)])

    def _rows(self, encoded: list[list[int]]) -> np.ndarray:
        batch = np.full((len(encoded), self.max_length), self.pad_id, dtype=np.int32)
        for row, tokens in enumerate(encoded):
            ids = [self.bos_id, *tokens[: self.max_length - 2], self.eos_id]
            batch[row, : len(ids)] = ids
        return batch


def _special_token(value: Any, folder: Path) -> tuple[str, bool]:
    """A special token as saved by transformers: a plain string (un-normalised) or an AddedToken dict."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    raise WeightsError(f"{folder}: special token {value!r} is neither a string nor an AddedToken object")


def _checked_vocab(vocab: Any, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise WeightsError(f"{where}: expected a JSON object of token → integer id")
    return vocab


def _read_vocab(path: Path) -> dict[str, int]:
    return _checked_vocab(read_json(path, _TOKENIZER_FILES, WeightsError), str(path))


def _merge_pair(merge: Any) -> tuple[str, str] | None:
    """A merge as `tokenizers` saves it, "left right" or ["left", "right"] → the pair; None when malformed."""
    pair = merge.split(" ") if isinstance(merge, str) else merge
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair):
        return pair[0], pair[1]
    return None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` line, then one `left right` pair per line."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({_TOKENIZER_FILES})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{path}: not UTF-8 text ({exc})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = _merge_pair(line)
        if pair is None:
            raise WeightsError(f"{path}: line {number} is not a 'left right' merge pair: {line!r}")
        merges.append(pair)
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[Any]]:
    """tokenizer.json (the `tokenizers` library's file): its BPE model's vocab and merges, and its added tokens.

    Only those are read: transformers' CLIPTokenizer also rebuilds the normaliser and pre-tokenizer itself."""
    data = read_json(path, _TOKENIZER_FILES, WeightsError)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise WeightsError(f"{path}: expected a BPE tokenizer (model.type 'BPE', as CLIP's), found {kind!r}")
    vocab = _checked_vocab(model.get("vocab"), f"{path}: model.vocab")
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise WeightsError(f"{path}: model.merges must be a list of merge pairs")
    merges = []
    for number, merge in enumerate(raw_merges):
        pair = _merge_pair(merge)
        if pair is None:
            raise WeightsError(f"{path}: model.merges[{number}] is not a 'left right' merge pair: {merge!r}")
        merges.append(pair)
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise WeightsError(f"{path}: added_tokens must be a list of AddedToken objects")
    return vocab, merges, added


def _is_tokenizer_folder(path: Path) -> bool:
    return (path / TOKENIZER_JSON).is_file() or (path / "vocab.json").is_file()


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """Load the CLIP tokenizer of a converted or diffusers checkpoint: `path` is the checkpoint or its `tokenizer/`."""
    path = Path(path)
    if not _is_tokenizer_folder(path) and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    return CLIPTokenizer.from_pretrained(path)


def byte_level_tokenizer() -> CLIPTokenizer:
    """A vocabulary-free stand-in for the random-weight model: one token per byte, CLIP's special-token ids.

    Ids follow the real CLIP layout (bytes 0–255, bytes+</w> 256–511, bos/eos 49406/49407), so they fit
    any CLIP text encoder; there are no merges, so it needs no vocabulary file.
    """
    symbols = list(byte_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + END_OF_WORD: len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab.update({BOS_TOKEN: 49406, EOS_TOKEN: 49407})
    return CLIPTokenizer(vocab, [], where="byte-level tokenizer")


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """Write `tokenizer` in the Hugging Face layout (vocab.json, merges.txt, tokenizer_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {i: token for token, i in tokenizer.vocab.items()}
    ranked = sorted(tokenizer.merge_ranks.items(), key=lambda item: item[1])
    (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for (left, right), _ in ranked)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length,
              "bos_token": by_id[tokenizer.bos_id], "eos_token": by_id[tokenizer.eos_id],
              "pad_token": by_id[tokenizer.pad_id], "unk_token": by_id[tokenizer.unk_id]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
