"""The studio page over HTTPS in a real browser, as a visitor on another device meets it: a certificate the
studio made for itself (Chromium told to accept it, as a visitor does once at the warning), the fake webcam's
frames in over wss, AI frames back; the host's page has the host-only controls and the QR code, the visitor's
has neither. Screenshots of both pages are written to the test's folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from test_studio import Studio
from test_studio_browser import (CHROMIUM, _launch, _wait, sync_api, webcam_frames, webcam_reaches_the_model,
                                 write_y4m)

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)"),
              pytest.mark.policy_independent]


@pytest.mark.timeout(300)
def test_visitor_and_host_pages_over_https_with_the_browser_webcam(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared"
    y4m = write_y4m(tmp_path / "webcam.y4m", webcam_frames(shared if shared.is_dir() else None))
    studio = Studio(tmp_path, "--tls", "--render-size", "192x128", env={"MLX_SDXS_CACHE": str(tmp_path / "cache")})
    try:
        with sync_api.sync_playwright() as playwright:
            browser = _launch(playwright, y4m)
            visitor = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 1000}).new_page()
            assert studio.base.startswith("https://")
            assert visitor.goto(f"{studio.base}/?token={studio.token}").status == 200
            assert visitor.evaluate("window.isSecureContext && location.protocol") == "https:"
            _wait(lambda: visitor.text_content("#connection") == "live", what="the WebSocket over wss")
            webcam_reaches_the_model(visitor, studio.base, 192)  # frames in over wss, AI frames back
            assert not visitor.is_visible("#record") and not visitor.is_visible("#invite")
            visitor.screenshot(path=str(tmp_path / "studio-visitor-https.png"), full_page=True)

            host = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 1100}).new_page()
            assert host.goto(f"{studio.base}/?token={studio.host_token}").status == 200
            _wait(lambda: host.is_visible("#invite") and host.is_visible("#record"), what="the host's controls")
            _wait(lambda: host.evaluate("document.querySelector('#qr').naturalWidth") > 0, what="the QR code")
            visitor_url = f"{studio.base}/?token={studio.token}"
            assert host.text_content("#visitor-url") == visitor_url
            shown = cv2.imdecode(np.frombuffer(host.locator("#qr").screenshot(), np.uint8), cv2.IMREAD_GRAYSCALE)
            assert cv2.QRCodeDetectorAruco().detectAndDecode(shown)[0] == visitor_url  # the code on screen scans
            _wait(lambda: host.evaluate("document.querySelector('#output').naturalWidth") == 192,
                  what="AI frames on the host's page")
            host.screenshot(path=str(tmp_path / "studio-host-https.png"), full_page=True)
            browser.close()
    finally:
        code, _, err = studio.stop()
    assert code == 130, err
    print(f"screenshots: {tmp_path / 'studio-visitor-https.png'} {tmp_path / 'studio-host-https.png'}")
