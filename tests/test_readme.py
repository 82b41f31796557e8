"""The README runs as pasted: every ```bash and ```python block, in order, offline, on a fresh checkout's venv.

Each block runs in one temporary folder shared by all (a later block may use a file an earlier one made, as
a reader following the README would), with the project's venv on PATH and `.venv` linked there (so
`source .venv/bin/activate` works), offline (`HF_HUB_OFFLINE=1`, an empty `HF_HOME`, `MLX_SDXS_WEIGHTS` in the
temp folder) and without a display, at the toy scale of `MLX_SDXS_SMOKE=1` (see `mlx_sdxs.smoke`: tiny random
models, small sizes, sessions that stop after a couple of frames), so the whole walk takes seconds per command.

Not run:
- `bash scripts/setup.sh …` lines: the set-up made the venv this test runs in;
- a block right after a `<!-- readme-test: skip: REASON -->` line (the reason is required): for what cannot run
  offline or on a fresh clone (the Hub, your own checkpoint, the whole suite). Keep them few.
A failing command fails the test, naming its block (README line) and the command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_sdxs import smoke

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>.*?)\s*-->")
SETUP = re.compile(r"^\s*bash scripts/setup\.sh\b")
LANGUAGES = ("bash", "python")
#: Per block; the README's whole walk takes ~1 min on a 2-core CPU.
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the marker's reason

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def blocks(text: str) -> list[Block]:
    """Every fenced block of `text` in a language this test runs, with its skip marker's reason, if any."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(before)
        if fence.group(1) in LANGUAGES:
            found.append(Block(fence.group(1), i + 1, "\n".join(lines[i + 1 : end]) + "\n",
                               marker.group("reason") if marker else None))
        i = end + 1
    return found


def bash_script(code: str) -> str:
    """The block as a bash script that stops at the first failing command and names it."""
    kept = [("# (not rerun: the set-up made this venv) " + line) if SETUP.match(line) else line
            for line in code.splitlines()]
    return "\n".join(["set -eo pipefail",
                      "trap 'echo \"README command failed: $BASH_COMMAND\" >&2' ERR", *kept]) + "\n"


class Walk:
    """The README's walk: one temp folder and environment; a block runs after every block above it ran once."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / ".venv").symlink_to(Path(sys.executable).parents[1])
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "VIRTUAL_ENV")}
        env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
                    "HF_HOME": str(folder / "hf-home"), "MLX_SDXS_WEIGHTS": str(folder / "weights"), smoke.ENV: "1",
                    "PYTHONUNBUFFERED": "1"})
        self.env = env
        self.results: dict[Block, subprocess.CompletedProcess] = {}

    def through(self, block: Block) -> subprocess.CompletedProcess:
        """`block`'s run, after those of the runnable blocks above it (so `-k` one block works too)."""
        for earlier in README_BLOCKS[: README_BLOCKS.index(block) + 1]:
            if earlier.skip is None and earlier not in self.results:
                self.results[earlier] = run_block(earlier, self.folder, self.env)
        return self.results[block]


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Walk:
    return Walk(tmp_path_factory.mktemp("readme"))


def run_block(block: Block, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = folder / f"readme-{block.line}.{'sh' if block.language == 'bash' else 'py'}"
    script.write_text(bash_script(block.code) if block.language == "bash" else block.code)
    command = ["bash", str(script)] if block.language == "bash" else [sys.executable, str(script)]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


README_BLOCKS = blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks_and_every_skip_gives_its_reason():
    assert {b.language for b in README_BLOCKS if b.skip is None} == set(LANGUAGES)
    assert all(b.skip.strip() for b in README_BLOCKS if b.skip is not None)
    assert sum(b.skip is not None for b in README_BLOCKS) <= 3, "keep the README's exceptions few"


@pytest.mark.timeout(TIMEOUT_S * len(README_BLOCKS))
@pytest.mark.parametrize("block", README_BLOCKS, ids=str)
def test_readme_block_runs_as_pasted(block: Block, walk: Walk):
    if block.skip is not None:
        pytest.skip(f"{block}: {block.skip}")
    result = walk.through(block)
    failed = re.findall(r"README command failed: (.*)", result.stderr)
    assert result.returncode == 0, (f"{block} failed (exit {result.returncode})"
                                    + (f" at: {failed[-1]}" if failed else "") + f"\n{result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, f"{block}:\n{result.stderr[-3000:]}"


# ---- the test can fail: a broken command is reported with its block and command ----------------------------


def test_a_broken_command_fails_naming_its_block_and_command(walk, tmp_path):
    text = "intro\n\n```bash\nmlx-sdxs info\nmlx-sdxs txt2img --prompt x --size 100\necho never\n```\n"
    [block] = blocks(text)
    result = run_block(block, tmp_path, walk.env)
    assert result.returncode != 0 and str(block) == "README.md:3 (bash)"
    assert re.findall(r"README command failed: (.*)", result.stderr) == ["mlx-sdxs txt2img --prompt x --size 100"]
    assert "never" not in result.stdout


def test_markers_skip_only_their_block_and_setup_lines_are_not_rerun():
    text = ("<!-- readme-test: skip: needs the Hub -->\n```bash\nmlx-sdxs download x\n```\n\n"
            "```python\nprint(1)\n```\n```text\nnot code\n```\n")
    assert [(b.language, b.skip) for b in blocks(text)] == [("bash", "needs the Hub"), ("python", None)]
    script = bash_script("bash scripts/setup.sh test\nmlx-sdxs info\n")
    assert "\nmlx-sdxs info" in script and "\nbash scripts/setup.sh" not in script


def test_the_smoke_scale_and_nothing_else(monkeypatch):
    import argparse

    monkeypatch.delenv(smoke.ENV, raising=False)
    args = argparse.Namespace(model="sdxs-512-dreamshaper-sketch", size=(640, 384), source=None, max_frames=None)
    smoke.shrink(args)
    assert vars(args) == {"model": "sdxs-512-dreamshaper-sketch", "size": (640, 384), "source": None, "max_frames": None}
    assert smoke.model("IDKiro/sdxs-512-0.9") == "IDKiro/sdxs-512-0.9"

    monkeypatch.setenv(smoke.ENV, "1")
    kinds = {None: "random-tiny", "random": "random-tiny", "stabilityai/sd-turbo": "random-tiny", "./my/folder": "random-tiny",
             "sdxs-512-dreamshaper-anime": "random-tiny", "sdxs-512-dreamshaper-sketch": "random-tiny-sketch",
             "IDKiro/sdxs-512-dreamshaper-sketch": "random-tiny-sketch", "random-sdxs-512-dreamshaper-sketch":
             "random-tiny-sketch"}
    assert {name: smoke.model(name) for name in kinds} == kinds
    smoke.shrink(args)
    assert vars(args) == {"model": "random-tiny-sketch", "size": smoke.SIZE, "source": "synthetic",
                          "max_frames": smoke.MAX_FRAMES}
