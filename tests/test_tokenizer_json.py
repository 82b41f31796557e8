"""Checkpoints as today's libraries save them: transformers 5 writes the CLIP tokenizer as `tokenizer.json` only
(no vocab.json / merges.txt), and such a folder must load, convert and tokenize exactly as transformers does.

The folders are saved by the installed transformers and diffusers, then made tokenizer.json-only whatever
their version (transformers < 5 also writes vocab.json + merges.txt), so the test checks the same thing
everywhere. Tiny fixture vocabulary always; the real 49,408-token one from ../shared where present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_sdxs.errors import WeightsError
from mlx_sdxs.tokenizer import TOKENIZER_JSON, load_tokenizer
from test_tokenizer import CONFIGS, EDGE_PROMPTS, TINY, TINY_CONFIGS, assert_same_ids, generated_prompts

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

transformers = pytest.importorskip("transformers")

#: How tokenizers may write BPE merges in tokenizer.json: [left, right] pairs (tokenizers ≥ 0.20) or "left right".
MERGE_FORMS = ("pairs", "strings")


def save_tokenizer_json(vocab_dir: Path, folder: Path, merges: str = "pairs") -> Path:
    """`vocab_dir`'s tokenizer saved by the installed transformers, reduced to what transformers 5 writes."""
    transformers.CLIPTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    make_tokenizer_json_only(folder, merges)
    return folder


def make_tokenizer_json_only(folder: Path, merges: str = "pairs") -> None:
    """Drop the files transformers < 5 writes besides tokenizer.json; write its merges in the `merges` form."""
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    data = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = pairs if merges == "pairs" else [" ".join(pair) for pair in pairs]
    (folder / TOKENIZER_JSON).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def with_configs(folder: Path, config: dict | None, special_map: dict | None) -> Path:
    """Replace the saved tokenizer_config.json (None: none at all) and add special_tokens_map.json."""
    (folder / "tokenizer_config.json").unlink(missing_ok=True)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


def test_transformers_saves_tokenizer_json(tmp_path):
    folder = save_tokenizer_json(TINY, tmp_path / "tokenizer")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("merges", MERGE_FORMS)
def test_tiny_tokenizer_json_as_saved(tmp_path, merges):
    folder = save_tokenizer_json(TINY, tmp_path / "tokenizer", merges)
    assert_same_ids(folder, EDGE_PROMPTS + generated_prompts(120, seed=2))


@pytest.mark.parametrize("config, special_map", TINY_CONFIGS.values(), ids=TINY_CONFIGS.keys())
def test_tiny_tokenizer_json_special_token_files(tmp_path, config, special_map):
    folder = with_configs(save_tokenizer_json(TINY, tmp_path / "tokenizer"), config, special_map)
    assert_same_ids(folder, EDGE_PROMPTS + generated_prompts(60, seed=3))


def test_added_tokens_of_tokenizer_json_are_read(tmp_path):
    """tokenizer.json's `added_tokens` decide how the special tokens match (here: after lower-casing), unless
    tokenizer_config.json has its own `added_tokens_decoder`."""
    folder = save_tokenizer_json(TINY, tmp_path / "tokenizer")
    data = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        token["normalized"] = True
    (folder / TOKENIZER_JSON).write_text(json.dumps(data), encoding="utf-8")
    prompts = ["A <|ENDOFTEXT|> b!", "<|StartOfText|>x", "<|endoftext|>"]
    assert_same_ids(folder, prompts)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.encode("<|ENDOFTEXT|>") == [tokenizer.eos_id]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.update(model={"type": "Unigram", "vocab": []}), "expected a BPE tokenizer"),
        (lambda d: d["model"].update(vocab=["a", "b"]), r"model.vocab: expected a JSON object"),
        (lambda d: d["model"].update(merges="t h"), "model.merges must be a list"),
        (lambda d: d["model"]["merges"].insert(0, "t h e"), r"model.merges\[0\] is not a 'left right' merge pair"),
        (lambda d: d["model"]["merges"].insert(0, ["t", 3]), r"model.merges\[0\]"),
        (lambda d: d["model"]["merges"].insert(0, ["t", "qqqq"]), "'qqqq', which is not in the vocabulary"),
        (lambda d: d.update(added_tokens={"x": 1}), "added_tokens must be a list"),
    ],
)
def test_corrupt_tokenizer_json_raises_weights_error(tmp_path, damage, message):
    folder = save_tokenizer_json(TINY, tmp_path / "tokenizer")
    data = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    damage(data)
    (folder / TOKENIZER_JSON).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(WeightsError, match=message):
        load_tokenizer(folder)


def test_empty_folder_names_both_layouts(tmp_path):
    with pytest.raises(WeightsError, match="needs tokenizer.json, or vocab.json and merges.txt"):
        load_tokenizer(tmp_path)


# ---- a whole checkpoint saved by diffusers' StableDiffusionPipeline.save_pretrained ----------------------------


def save_diffusers_checkpoint(vocab_dir: Path, dst: Path) -> Path:
    """The tiny SDXS-shaped models, and `vocab_dir`'s tokenizer, saved as one pipeline by the installed diffusers."""
    import diffusers

    from checkpoints import SCHEDULER_CONFIG, tiny_text_encoder, tiny_unet, tiny_vae

    tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab_dir)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(dst, safe_serialization=True)
    make_tokenizer_json_only(dst / "tokenizer")
    return dst


def vocabularies() -> list:
    from conftest import SHARED

    real = SHARED / "data" / "clip-tokenizer"
    skip = pytest.mark.skipif(not real.is_dir(), reason=f"the real CLIP vocabulary {real} is absent (CI has it)")
    return [pytest.param(TINY, id="tiny"), pytest.param(real, id="real-clip", marks=skip)]


@pytest.mark.parametrize("vocab_dir", vocabularies())
def test_diffusers_checkpoint_with_tokenizer_json_converts_and_loads(tmp_path, vocab_dir):
    from mlx_sdxs.pipeline import SDXSPipeline

    checkpoint = save_diffusers_checkpoint(vocab_dir, tmp_path / "diffusers")
    assert not (checkpoint / "tokenizer" / "vocab.json").exists()
    # Through the hub: a local diffusers checkpoint is converted once under the weights root, then loaded.
    pipeline = SDXSPipeline.from_pretrained(str(checkpoint), weights_root=tmp_path / "weights")
    assert (tmp_path / "weights").is_dir() and pipeline.label is None
    assert pipeline.tokenizer.max_length == 77  # transformers' "very large" model_max_length placeholder → CLIP's 77
    prompts = EDGE_PROMPTS + generated_prompts(120, seed=4) + ["a lighthouse at dusk, " * 30]
    assert_same_ids(checkpoint / "tokenizer", prompts, pipeline.tokenizer)


def test_conversion_refuses_an_unreadable_tokenizer_before_writing(tmp_path):
    from checkpoints import build_checkpoint
    from mlx_sdxs.convert import convert_checkpoint

    checkpoint = build_checkpoint(tmp_path / "diffusers")
    for file in (checkpoint / "tokenizer").iterdir():
        file.unlink()
    (checkpoint / "tokenizer" / TOKENIZER_JSON).write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(WeightsError, match="expected a BPE tokenizer"):
        convert_checkpoint(checkpoint, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists() and list(tmp_path.iterdir()) == [checkpoint]
