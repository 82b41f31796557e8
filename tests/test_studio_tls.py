"""Visitors on other devices: HTTPS with a certificate the studio makes for itself, this machine's every address
as Host on a wildcard bind, a visitor token and a host token, the QR code of the visitor URL. Everything stays on
loopback: the server runs with --tls on 127.0.0.1, and the Guard's host set for 0.0.0.0 is checked directly.

Checked: the page, /api/status and the WebSocket over HTTPS/wss with a client that trusts only the made
certificate (and one that trusts nothing is refused by TLS itself); wrong tokens refused; a visitor cannot record,
switch the server's source, fetch a recording or the QR code, the host can; the certificate is kept (same
fingerprint on the next start, the key 0600) and remade when the machine gains a name; the terminal QR code
decodes to the visitor URL.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import ssl
import stat
import types

import cv2
import numpy as np
import pytest

from mlx_sdxs.errors import SDXSError

pytest.importorskip("starlette", reason="the studio extra is not installed")
websockets = pytest.importorskip("websockets", reason="the studio extra is not installed")

from mlx_sdxs.studio import invite, network, tls  # noqa: E402
from mlx_sdxs.studio.guard import HOST, HOST_ONLY, VISITOR, Guard, control_refusal  # noqa: E402
from test_studio import Studio  # noqa: E402

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

FINGERPRINT_LINE = re.compile(r"^\s+((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$", re.M)
PORT = 8765


def _guard(bind_host: str) -> Guard:
    return Guard(None, {"visitor-token": VISITOR, "host-token": HOST}, network.host_headers(bind_host, PORT, "https"))


def test_a_wildcard_bind_accepts_every_address_and_name_of_this_machine_and_nothing_else():
    guard = _guard("0.0.0.0")
    hostname = socket.gethostname().lower()
    names = [*network.interface_addresses(), "127.0.0.1", "localhost", "::1", hostname]
    names += [] if "." in hostname else [f"{hostname}.local"]
    for name in names:
        assert guard.resolve({"host": network.authority(name, PORT)}, "visitor-token") == (VISITOR, 0), name
    assert guard.resolve({"host": f"LOCALHOST:{PORT}"}, "host-token") == (HOST, 0)  # host names are case-blind
    foreign = "203.0.113.7"  # TEST-NET-3: documentation only, never an interface of this machine
    assert foreign not in network.interface_addresses()
    for host in (f"{foreign}:{PORT}", f"evil.example:{PORT}", f"127.0.0.1:{PORT + 1}", "", f"{hostname}.evil.example"):
        assert guard.resolve({"host": host}, "visitor-token") == (None, 403), host  # DNS rebinding
    # a loopback bind takes the loopback names only, not the LAN addresses
    outside = [a for a in network.interface_addresses() if a not in ("127.0.0.1", "::1")]
    loopback_guard = _guard("127.0.0.1")
    for address in outside:
        assert loopback_guard.resolve({"host": network.authority(address, PORT)}, "visitor-token")[1] == 403
    assert loopback_guard.resolve({"host": f"127.0.0.1:{PORT}"}, None) == (None, 401)
    assert loopback_guard.resolve({"host": f"127.0.0.1:{PORT}"}, "guessed") == (None, 403)
    cookie = {"host": f"127.0.0.1:{PORT}", "cookie": "mlx_sdxs_token=host-token"}
    assert loopback_guard.resolve(cookie, None) == (HOST, 0)


def test_the_host_only_controls():
    for message in ({"type": "record", "action": "start"}, {"type": "record", "action": "stop"},
                    {"type": "source", "source": "synthetic"}, {"type": "source", "source": "camera 0"}):
        assert control_refusal(VISITOR, json.dumps(message)) == HOST_ONLY
        assert control_refusal(HOST, json.dumps(message)) is None
    for anyone in ({"type": "source", "source": "browser"}, {"type": "source", "source": "draw"},
                   {"type": "prompt", "prompt": "a fox"}, {"type": "settings", "feedback": 0.2}):
        assert control_refusal(VISITOR, json.dumps(anyone)) is None
    for not_a_control in ("not JSON", "[1]"):  # the controls count these
        assert control_refusal(VISITOR, not_a_control) is None


def test_the_made_certificate_is_kept_covers_its_names_and_its_key_is_private(tmp_path):
    from cryptography import x509

    names = ["127.0.0.1", "localhost", "::1", "studio-test"]
    first = tls.self_signed(names, tmp_path)
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    assert tls.self_signed(reversed(names), tmp_path) == first  # kept
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {*alt.get_values_for_type(x509.DNSName), *map(str, alt.get_values_for_type(x509.IPAddress))} == set(names)
    assert tls.fingerprint(first.cert.read_text()) == first.fingerprint
    gained = tls.self_signed([*names, "192.0.2.77"], tmp_path)  # the machine gained an address
    assert gained.fingerprint != first.fingerprint and stat.S_IMODE(gained.key.stat().st_mode) == 0o600
    assert tls.given(gained.cert, gained.key).fingerprint == gained.fingerprint


def test_certificate_choices_and_their_errors(tmp_path):
    a, b = tls.self_signed(["localhost"], tmp_path / "a"), tls.self_signed(["localhost"], tmp_path / "b")
    with pytest.raises(SDXSError, match="go together"):
        tls.choose(None, a.cert, None, "127.0.0.1", ["localhost"])
    with pytest.raises(SDXSError, match="contradicts"):
        tls.choose(False, a.cert, a.key, "127.0.0.1", ["localhost"])
    with pytest.raises(SDXSError, match="the key matching the certificate"):
        tls.choose(None, a.cert, b.key, "127.0.0.1", ["localhost"])
    with pytest.raises(SDXSError, match="no such TLS file"):
        tls.given(tmp_path / "missing.pem", a.key)
    from cryptography.hazmat.primitives import serialization

    locked = tmp_path / "locked.pem"
    key = serialization.load_pem_private_key(a.key.read_bytes(), password=None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(SDXSError, match="the TLS key is encrypted"):  # never a password prompt
        tls.given(a.cert, locked)
    assert tls.choose(None, None, None, "127.0.0.1", ["localhost"]) is None  # loopback: plain HTTP is a secure page
    assert tls.choose(False, None, None, "0.0.0.0", ["localhost"]) is None
    assert tls.choose(None, a.cert, a.key, "127.0.0.1", ["localhost"]).fingerprint == a.fingerprint


def test_the_terminal_qr_code_reads_back_as_the_visitor_url():
    url = "https://192.0.2.2:8765/?token=" + "x" * 32
    server = types.SimpleNamespace(visitor_urls=[url], addresses=["192.0.2.2"], token="x" * 32, certificate=None,
                                   host="0.0.0.0", host_url=url.replace("x" * 32, "h" * 32),
                                   url_at=lambda address, token, path: f"https://{address}:8765{path}?token={token}")
    out = io.StringIO()
    invite.announce(server, out)
    text = out.getvalue()
    assert text.index(f"studio at {url}") < text.index("scan to join") < text.index("host controls: ")
    rows = [line for line in text.splitlines() if set(line) <= set("█▀▄ ") and line]
    # each character is two modules, top and bottom: █ both light, ▀ top light, ▄ bottom light, space both dark
    top = {"█": 255, "▀": 255, "▄": 0, " ": 0}
    bottom = {"█": 255, "▀": 0, "▄": 255, " ": 0}
    modules = np.array([[table[c] for c in row] for row in rows for table in (top, bottom)], np.uint8)
    image = cv2.resize(modules, None, fx=8, fy=8, interpolation=cv2.INTER_NEAREST)
    decoded, _, _ = cv2.QRCodeDetectorAruco().detectAndDecode(image)  # (the classic one misses clean synthetic codes)
    assert decoded == url


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, cache):
    server = Studio(tmp_path_factory.mktemp("studio"), "--tls", "--source", "synthetic",
                    env={"MLX_SDXS_CACHE": str(cache)})
    server.context = ssl.create_default_context(cafile=str(tls.folder(cache) / tls.CERT_FILE))
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.mark.timeout(120)
def test_https_page_status_and_wss_with_the_made_certificate(studio, cache):
    assert studio.scheme == "https"
    printed = FINGERPRINT_LINE.search("".join(studio.log)).group(1)
    assert printed == tls.fingerprint((tls.folder(cache) / tls.CERT_FILE).read_text())
    status, headers, body = studio.get("/")
    assert status == 200 and b"<title>mlx-sdxs studio</title>" in body
    status, _, body = studio.get("/api/status")
    assert status == 200 and json.loads(body)["source"] == "synthetic"
    assert studio.get("/api/status", token="wrong")[0] == 403
    assert studio.get("/api/status", token=None)[0] == 401
    trusting_nothing, studio.context = studio.context, ssl.create_default_context()
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            studio.get("/api/status")
    finally:
        studio.context = trusting_nothing

    async def attempt(url):
        try:
            async with websockets.connect(url, ssl=studio.context, max_size=2**24) as ws:
                while True:
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, bytes) and message[:1] == b"\x01":  # an AI frame over wss
                        return cv2.imdecode(np.frombuffer(message[1:], np.uint8), cv2.IMREAD_COLOR).shape
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code

    assert studio.ws_url().startswith("wss://")
    assert asyncio.run(attempt(studio.ws_url(token=studio.host_token))) == (128, 128, 3)  # the host's stream
    assert asyncio.run(attempt(studio.ws_url(token="wrong"))) == 403


@pytest.mark.timeout(120)
def test_a_visitor_cannot_record_or_switch_the_servers_source_and_the_host_can(studio):
    async def reply(ws, message: dict) -> dict:
        await ws.send(json.dumps(message))
        while True:
            answer = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(answer, str) and json.loads(answer)["type"] in ("error", "recording"):
                return json.loads(answer)
            if isinstance(answer, str) and message["type"] == "source":
                status = json.loads(answer)
                if status["type"] == "status" and status["source"] == message["source"]:
                    return status

    async def session():
        async with websockets.connect(studio.ws_url(), ssl=studio.context) as visitor, \
                websockets.connect(studio.ws_url(token=studio.host_token), ssl=studio.context) as host:
            refused = [await reply(visitor, {"type": "record", "action": "start"}),
                       await reply(visitor, {"type": "source", "source": "camera 0"})]
            started = await reply(host, {"type": "record", "action": "start"})
            stopped = await reply(host, {"type": "record", "action": "stop"})
            switched = [await reply(host, {"type": "source", "source": "browser"}),
                        await reply(host, {"type": "source", "source": "synthetic"})]
            return refused, started, stopped, switched

    refused, started, stopped, switched = asyncio.run(session())
    assert all(r == {"type": "error", "message": HOST_ONLY} for r in refused)
    assert started["started"].startswith("mlx-sdxs-") and "finished" in stopped
    assert [s["source"] for s in switched] == ["browser", "synthetic"]

    status, _, body = studio.get("/recordings/x.mp4")
    assert status == 403 and body.decode() == HOST_ONLY
    assert studio.get("/recordings/x.mp4", token=studio.host_token)[0] == 404  # past the Guard: no such file
    assert studio.get("/qr.svg")[0] == 403
    status, headers, svg = studio.get("/qr.svg", token=studio.host_token)
    visitor_url = f"https://127.0.0.1:{studio.port}/?token={studio.token}"
    assert status == 200 and headers["content-type"] == "image/svg+xml" and svg == invite.qr_svg(visitor_url)
    assert json.loads(studio.get("/api/whoami")[2]) == {"role": "visitor"}
    host = json.loads(studio.get("/api/whoami", token=studio.host_token)[2])
    assert host == {"role": "host", "visitor_url": visitor_url}


@pytest.mark.timeout(120)
def test_the_next_start_serves_the_same_certificate(studio, cache, tmp_path):
    again = Studio(tmp_path, "--tls", env={"MLX_SDXS_CACHE": str(cache)})
    try:
        first, second = (FINGERPRINT_LINE.search("".join(s.log)).group(1) for s in (studio, again))
        assert first == second
        key = tls.folder(cache) / tls.KEY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        with socket.create_connection(("127.0.0.1", again.port), timeout=15) as raw, \
                ssl.create_default_context(cafile=str(tls.folder(cache) / tls.CERT_FILE)).wrap_socket(
                    raw, server_hostname="127.0.0.1") as conn:
            served = conn.getpeercert(binary_form=True)
        assert tls.fingerprint(ssl.DER_cert_to_PEM_cert(served)) == first
    finally:
        again.stop()
