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

            # The fake webcam's frames reach the model, and the output on screen changes.
            _wait(lambda: int(page.text_content("#received")) > 5, what="webcam frames sent")
            _wait(lambda: page.evaluate("document.querySelector('#output').naturalWidth") == 192,
                  what="the first AI frame on screen")
            first = page.locator("#output").screenshot()
            _wait(lambda: page.locator("#output").screenshot() != first, what="the output to change")
            status = page.request.get(f"{studio.base}/api/status").json()
            assert status["source"] == "browser" and status["frames_received"] > 5 and status["inferred"] > 1

            # A typed prompt takes effect.
            page.fill("#prompt", "a neon city at night")
            page.press("#prompt", "Enter")
            _wait(lambda: page.request.get(f"{studio.base}/api/status").json()["prompt"] == "a neon city at night",
                  what="the prompt to reach the loop")

            # A snapshot downloads a PNG and appears in the gallery.
            with page.expect_download() as download_info:
                page.click("#snapshot")
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            assert saved.suffix == ".png" and cv2.imread(str(saved)).shape == (128, 192, 3)
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
