"""The studio page in a real browser: headless Chromium (Debian's) with a fake webcam playing the shared
photos, driven by Playwright as a person would. Skips with the reason where no Chromium is installed;
`scripts/setup.sh test` installs it on Debian/Ubuntu, so CI runs it.

Checked: the page opens with the token, the webcam's frames reach the model and the output changes on
screen, a typed prompt takes effect, a snapshot downloads a PNG and joins the gallery, a wrong token
is refused. A screenshot of the page is written to the test's folder (docs/studio.png is one of them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_studio import Studio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytest.importorskip("starlette", reason="the studio extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)"),
              pytest.mark.policy_independent]


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """A YUV4MPEG2 (4:2:0) file, what Chromium's fake capture device plays in a loop."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


def webcam_frames(shared: Path | None) -> list[np.ndarray]:
    """A few seconds of 'webcam': the shared photos, each held and slowly panned; else a moving test scene."""
    from mlx_sdxs.camera.sources import SyntheticSource

    photos = sorted((shared / "data" / "images").glob("*.png")) if shared else []
    if not photos:
        source = SyntheticSource(320, 240, fps=10)
        return [source.render(i) for i in range(30)]
    frames = []
    for photo in photos:
        image = cv2.resize(cv2.imread(str(photo)), (360, 270))
        frames += [np.ascontiguousarray(image[i: i + 240, i: i + 320]) for i in range(0, 30, 3)]
    return frames


def _launch(playwright, y4m: Path):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}"])


def _wait(predicate, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # the page updates on its own schedule; polling it is what a watching person does
    raise AssertionError(f"timed out waiting for {what}")


def webcam_reaches_the_model(page, base: str, width: int) -> None:
    """The fake webcam's frames reach the model, and the output on screen (`width` wide) changes."""
    _wait(lambda: int(page.text_content("#received")) > 5, what="webcam frames sent")
    _wait(lambda: page.evaluate("document.querySelector('#output').naturalWidth") == width,
          what="the first AI frame on screen")
    first = page.locator("#output").screenshot()
    _wait(lambda: page.locator("#output").screenshot() != first, what="the output to change")
    status = page_status(page)  # a visitor's page: its own stream, which /api/status (the host's) is not
    assert status["source"] == "browser" and status["frames_received"] > 5 and status["inferred"] > 1
    assert status["stream"] == "own"


def page_status(page) -> dict:
    """The status of the page's own stream, as the server last sent it to the page."""
    return page.evaluate("state.status")


@pytest.mark.timeout(300)
def test_studio_page_with_the_browser_webcam_end_to_end(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared"
    y4m = write_y4m(tmp_path / "webcam.y4m", webcam_frames(shared if shared.is_dir() else None))
    studio = Studio(tmp_path, "--render-size", "192x128")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = _launch(playwright, y4m)
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            response = page.goto(f"{studio.base}/?token={studio.token}")
            assert response.status == 200
            _wait(lambda: page.text_content("#connection") == "live", what="the WebSocket")
            _wait(lambda: page.is_visible("#random-banner"), what="the RANDOM WEIGHTS banner")

            webcam_reaches_the_model(page, studio.base, 192)

            # A typed prompt takes effect.
            page.fill("#prompt", "a neon city at night")
            page.press("#prompt", "Enter")
            _wait(lambda: page_status(page)["prompt"] == "a neon city at night",
                  what="the prompt to reach the loop")

            # A snapshot downloads the visitor's own output as shown and appears in the gallery.
            with page.expect_download() as download_info:
                page.click("#snapshot")
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            assert saved.suffix == ".jpg" and cv2.imread(str(saved)).shape == (128, 192, 3)
            _wait(lambda: page.locator("#snapshots img").count() == 1, what="the gallery thumbnail")

            page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)

            # Somebody without the token gets nothing.
            stranger = browser.new_context().new_page()
            assert stranger.goto(f"{studio.base}/?token=wrong").status == 403
            assert stranger.goto(f"{studio.base}/").status == 401
            browser.close()
    finally:
        code, _, err = studio.stop()
    assert code == 130, err
    print(f"screenshot: {tmp_path / 'studio.png'}")


def _dark_pixels(page) -> int:
    """Ink on the drawing canvas: pixels darker than mid-grey."""
    return page.evaluate("""() => {
        const c = document.querySelector('#drawing');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 128) n++;
        return n;
    }""")


def _stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points`, given as fractions of the canvas."""
    box = page.locator("#drawing").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


@pytest.mark.timeout(300)
def test_drawing_canvas_steers_the_sketch_controlnet(tmp_path):
    """The draw source on a ControlNet model: strokes drawn with the mouse become frames, the output follows
    them (feedback and EMA off, so the output is a function of the drawing: undo brings the earlier output
    back exactly), and the tools work: brush size, eraser, undo, clear, upload, control strength."""
    y4m = write_y4m(tmp_path / "webcam.y4m", webcam_frames(None))
    studio = Studio(tmp_path, "--model", "random-tiny-sketch", "--source", "draw", "--render-size", "256",
                    "--feedback", "0", "--ema", "0")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = _launch(playwright, y4m)
            page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
            page.goto(f"{studio.base}/?token={studio.token}")
            _wait(lambda: page.text_content("#connection") == "live", what="the WebSocket")
            _wait(lambda: page.is_visible("#drawing") and page.is_visible("#draw-tools"), what="the canvas and tools")
            _wait(lambda: page.is_visible("#knob-control_strength"), what="the control strength slider")
            status = lambda: page_status(page)  # noqa: E731
            assert status()["source"] == "draw" and status()["control"] == "sketch"
            assert page.input_value("#source") == "draw"

            def output_after(action, what: str) -> bytes:
                """Run `action` (None: the page as it is), then wait for its frames to come back through the model."""
                before = status()["inferred"] if action else 0
                if action:
                    action()
                _wait(lambda: status()["inferred"] > before, what=f"the model to run on {what}")
                _wait(lambda: page.evaluate("document.querySelector('#output').naturalWidth") == 256,
                      what="an AI frame on screen")
                shots = [page.locator("#output").screenshot()]

                def settled() -> bool:  # the last frame of the action is shown: two looks a moment apart agree
                    shots.append(page.locator("#output").screenshot())
                    return shots[-1] == shots[-2]

                _wait(settled, what="the output to settle")
                return shots[-1]

            blank = output_after(None, "the blank page")
            assert _dark_pixels(page) == 0
            page.fill("#brush", "12")  # (a range input: fill sets its value and fires `input`)
            house = [(0.2, 0.8), (0.2, 0.45), (0.5, 0.2), (0.8, 0.45), (0.8, 0.8), (0.2, 0.8)]
            drawn = output_after(lambda: _stroke(page, house), "the strokes")
            ink = _dark_pixels(page)
            assert ink > 2000, f"a 12 px outline of a house leaves more ink than {ink} pixels"
            assert drawn != blank, "the output did not follow the strokes"
            _stroke(page, [(0.35, 0.8), (0.35, 0.6), (0.5, 0.6), (0.5, 0.8)])
            assert _dark_pixels(page) > ink
            page.click("#undo")
            assert _dark_pixels(page) == ink
            page.click("#eraser")
            _stroke(page, [(0.1, 0.8), (0.9, 0.8)])
            assert _dark_pixels(page) < ink
            page.click("#undo")
            page.click("#pen")
            assert _dark_pixels(page) == ink
            page.screenshot(path=str(tmp_path / "studio-draw.png"), full_page=True)
            # back to the blank page: the output the blank page gave
            assert output_after(lambda: page.click("#undo"), "the undone page") == blank
            assert _dark_pixels(page) == 0

            sketch = np.full((90, 120, 3), 255, np.uint8)
            cv2.circle(sketch, (60, 45), 30, (0, 0, 0), 4)
            cv2.imwrite(str(tmp_path / "circle.png"), sketch)
            page.set_input_files("#upload", str(tmp_path / "circle.png"))
            _wait(lambda: _dark_pixels(page) > 500, what="the uploaded sketch on the canvas")
            page.click("#clear")
            assert _dark_pixels(page) == 0

            page.fill("#knob-control_strength input", "1.5")
            _wait(lambda: status()["control_strength"] == 1.5, what="the control strength to reach the loop")
            page.select_option("#knob-control select", "lines")
            _wait(lambda: status()["control"] == "lines", what="the control mode to reach the loop")
            browser.close()
    finally:
        code, _, err = studio.stop()
    assert code == 130, err
    print(f"screenshot: {tmp_path / 'studio-draw.png'}")
