"""OSC control of a running camera session — how TouchDesigner, Max/MSP, Resolume and phone apps (TouchOSC)
drive live visuals. Built from the knob table: `/sdxs/<knob> value` (e.g. `/sdxs/prompt "a fox"`,
`/sdxs/ema 0.5`) is a request on the session's `LoopControl`, like a key or a studio slider; `/sdxs/status`
is answered, to the sender, with one message per knob and figure (`/sdxs/ema 0.5`, `/sdxs/ai_fps 3.2`, …).

UDP on 127.0.0.1 unless told otherwise (OSC has no token: a wider address lets anyone who reaches it steer).
A message that is not OSC, names no knob, or carries a bad value is counted by reason and dropped; the
session goes on. Needs the `osc` extra (python-osc, used to parse and build messages).
"""

from __future__ import annotations

import socket
import sys
import threading
from collections import Counter
from typing import Any, Callable, TextIO

from mlx_sdxs import loopback
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.knobs import KNOBS

PREFIX = "/sdxs/"
#: The live figures `/sdxs/status` reports besides the knobs.
FIGURES = ("ai_fps", "display_fps", "latency_ms")
#: The largest UDP payload; anything an OSC client sends fits.
MAX_DATAGRAM = 65507
POLL_S = 0.2


class OSCControl:
    """Listens on a thread from `start` until `close`. `received`, `dropped` (by reason) count messages."""

    def __init__(self, control: LoopControl, host: str = loopback.HOST, port: int = 0):
        try:
            from pythonosc.osc_message_builder import OscMessageBuilder
            from pythonosc.osc_packet import OscPacket, ParseError
        except ImportError:
            raise SDXSError("OSC control needs python-osc: pip install 'mlx-sdxs[osc]'") from None
        self._packet, self._parse_error, self._builder = OscPacket, ParseError, OscMessageBuilder
        self.control = control
        self.received = 0
        self.dropped: Counter[str] = Counter()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise SDXSError(f"cannot listen for OSC on udp {host}:{port} ({exc.strerror}); pick another --osc-port "
                            "(0 = any free)") from None
        self._socket.settimeout(POLL_S)
        self.host, self.port = host, self._socket.getsockname()[1]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sdxs-osc", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop listening; the port is free when this returns."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(5 * POLL_S)
        self._socket.close()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                data, sender = self._socket.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            self.handle(data, sender)

    def handle(self, data: bytes, sender: Any) -> None:
        """One datagram: a message or a bundle of them."""
        try:
            messages = [timed.message for timed in self._packet(data).messages]
        except (self._parse_error, ValueError, IndexError):
            self.dropped["not OSC"] += 1
            return
        for message in messages:
            self.received += 1
            reason = self._apply(message.address, list(message.params), sender)
            if reason:
                self.dropped[reason] += 1

    def _apply(self, address: str, params: list, sender: Any) -> str:
        """Act on one message; the reason it was dropped, or "" when it was taken."""
        name = address[len(PREFIX):] if address.startswith(PREFIX) else None
        if name == "status":
            self._reply(sender)
            return ""
        if name not in KNOBS:
            return "unknown address"
        if len(params) != 1:
            return "not one argument"
        try:
            self.control.request(**{name: params[0]})
        except SDXSError:
            return "bad value"
        return ""

    def status(self) -> list[tuple[str, Any]]:
        """(address, value) of every knob the session has (unset text knobs left out) and the live figures."""
        state = self.control.state
        values = [(name, value) for name, value in state.knobs().items() if value is not None]
        values += [(name, state.stats.get(name, 0.0)) for name in FIGURES]
        values.append(("osc_dropped", sum(self.dropped.values())))
        return [(PREFIX + name, value) for name, value in values]

    def _reply(self, sender: Any) -> None:
        for address, value in self.status():
            builder = self._builder(address)
            builder.add_arg(value)
            try:
                self._socket.sendto(builder.build().dgram, sender)
            except OSError:
                self.dropped["reply failed"] += 1
                return


def osc_hook(host: str, port: int, log: TextIO | None = None) -> Callable:
    """The session's `attach` hook that starts OSC control on `host`:`port` (and says where)."""
    log = log if log is not None else sys.stderr
    if host not in loopback.NAMES:
        print(f"mlx-sdxs: warning: OSC listens on {host}, not only this machine: any device that reaches it can "
              "steer the session (OSC has no token)", file=log)

    def attach(session) -> OSCControl:
        osc = OSCControl(session.control, host, port)
        osc.start()
        print(f"mlx-sdxs: OSC on udp {osc.host}:{osc.port}: {PREFIX}<knob> value "
              f"({', '.join(KNOBS)}); {PREFIX}status replies", file=log, flush=True)
        return osc

    return attach
