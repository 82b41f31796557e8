"""How people are let in: what a studio prints when it starts (the visitor URL and where else it answers, the
host's own URL, the certificate's fingerprint, and — when other devices can reach it — a QR code of the visitor
URL in the terminal), and the QR code the host's page shows."""

from __future__ import annotations

import io
from typing import TextIO

import segno

from mlx_sdxs import loopback


def qr_svg(url: str) -> bytes:
    """`url` as a QR code, an SVG small enough to inline in the page (medium error correction: scans off a screen)."""
    buffer = io.BytesIO()
    segno.make(url, error="m").save(buffer, kind="svg", scale=4, border=4, dark="black", light="white", xmldecl=False)
    return buffer.getvalue()


def announce(server, log: TextIO) -> None:
    """The started `server`'s URLs, the host's last (the first visitor URL is the one the QR code carries)."""
    urls = server.visitor_urls
    print(f"mlx-sdxs: studio at {urls[0]}  (MJPEG: {server.url_at(server.addresses[0], server.token, '/stream.mjpg')})",
          file=log)
    if len(urls) > 1:
        print("mlx-sdxs: also at " + "  ".join(urls[1:]), file=log)
    certificate = server.certificate
    if certificate is not None:
        what = ("a self-signed certificate: a browser warns once; proceed if it shows this SHA-256 fingerprint"
                if certificate.self_signed else f"the certificate {certificate.cert}, SHA-256 fingerprint")
        print(f"mlx-sdxs: HTTPS with {what}:\n    {certificate.fingerprint}", file=log)
    if server.host not in loopback.NAMES:
        print("mlx-sdxs: scan to join from a phone or another computer on this network:", file=log)
        segno.make(urls[0], error="m").terminal(out=log, compact=True)
    print(f"mlx-sdxs: host controls: {server.host_url}  (recording and the server's own sources: keep it to yourself)",
          file=log, flush=True)
