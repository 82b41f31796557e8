"""The prompt gallery the camera cycles through with n/p (ten styles, as in the SDXS camera demo), and prompt files."""

from __future__ import annotations

from pathlib import Path

from mlx_sdxs.errors import SDXSError

GALLERY = (
    "a watercolor painting, soft washes of colour, paper texture",
    "an oil painting in the style of van gogh, swirling thick brush strokes",
    "an anime still, cel shading, soft light, detailed background",
    "a cyberpunk portrait, neon lights, rain, cinematic",
    "a pencil sketch, cross-hatching, graphite on paper",
    "a 3d render of a cartoon character, soft global illumination",
    "a marble statue, classical sculpture, museum lighting",
    "a pop art poster, bold flat colours, halftone dots",
    "an ukiyo-e woodblock print, flat colours, bold outlines",
    "a claymation figure, plasticine texture, stop motion",
)


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SDXSError(f"--prompts {path}: {exc.strerror}") from None
    prompts = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            bad = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
            raise SDXSError(f"--prompts {path}, line {number}: not valid UTF-8 ({bad}); "
                            "save the file as UTF-8") from None
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise SDXSError(f"--prompts {path}: no prompts (one per line; '#' starts a comment)")
    return prompts
