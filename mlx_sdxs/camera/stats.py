"""What a camera session counts: frames through each stage, rates, capture→display latency."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

#: Latency percentiles are taken over at most this many recent frames (bounded memory in long sessions).
LATENCY_WINDOW = 100_000


class RateMeter:
    """Events per second (thread-safe: written by one thread, read by another). Until `window` events have
    happened since `start`, the rate is the session summary's own figure — events over the time since the
    start — so a live readout agrees with the summary from the first second; after that, the mean rate of
    the last `window` events, which follows changes."""

    def __init__(self, window: int = 30):
        self._stamps: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._started: float | None = None
        self._count = 0

    def start(self, now: float) -> None:
        """Count from `now` (the loop's start, after warm-up)."""
        with self._lock:
            self._started, self._count = now, 0
            self._stamps.clear()

    @property
    def started(self) -> float | None:
        return self._started

    def tick(self, now: float) -> None:
        with self._lock:
            self._stamps.append(now)
            self._count += 1

    def rate(self, now: float | None = None) -> float:
        """The rate now; 0 once events stopped for a while (e.g. every frame skipped as similar)."""
        with self._lock:
            stamps, started, count = list(self._stamps), self._started, self._count
        now = time.perf_counter() if now is None else now
        if started is not None and count < (self._stamps.maxlen or 0):
            return count / (now - started) if now > started else 0.0
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            return 0.0
        interval = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        return 0.0 if now - stamps[-1] > max(2.0, 3 * interval) else 1.0 / interval


@dataclass
class LoopStats:
    """Counters of one session. Each counter is written by one thread only."""

    captured: int = 0
    inferred: int = 0
    skipped_similar: int = 0
    dropped_before_inference: int = 0
    #: AI results replaced by a newer one before any display tick showed them.
    dropped_before_display: int = 0
    displayed: int = 0
    results_displayed: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    #: The backend's timing of its newest frame (ms; the recipe's: host work, submit to result).
    stage_ms: dict[str, float] = field(default_factory=dict)
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    ai_rate: RateMeter = field(default_factory=RateMeter, repr=False)
    display_rate: RateMeter = field(default_factory=RateMeter, repr=False)

    @property
    def dropped_stale(self) -> int:
        return self.dropped_before_inference + self.dropped_before_display

    def start(self, now: float) -> None:
        """The loop starts counting (after warm-up): the rates and `elapsed_s` count from here."""
        self.ai_rate.start(now)
        self.display_rate.start(now)

    def fps(self, count: int) -> float:
        return count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        if not self.latencies_s:
            return 0.0
        return float(np.percentile(np.fromiter(self.latencies_s, float), percentile) * 1000)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "captured": self.captured,
            "inferred": self.inferred,
            "skipped_similar": self.skipped_similar,
            "dropped_stale": self.dropped_stale,
            "dropped_before_inference": self.dropped_before_inference,
            "dropped_before_display": self.dropped_before_display,
            "displayed": self.displayed,
            "results_displayed": self.results_displayed,
            "elapsed_s": round(self.elapsed_s, 3),
            "ai_fps": round(self.fps(self.inferred), 3),
            "display_fps": round(self.fps(self.displayed), 3),
            "latency_ms_p50": round(self.latency_ms(50), 2),
            "latency_ms_p90": round(self.latency_ms(90), 2),
            "latency_ms_p99": round(self.latency_ms(99), 2),
            "stop_reason": self.stop_reason,
        }

    def live(self) -> dict[str, float | int | dict]:
        """The figures a status line or the studio page shows while the loop runs."""
        return {"ai_fps": round(self.ai_rate.rate(), 2), "display_fps": round(self.display_rate.rate(), 2),
                "latency_ms": round(self.latencies_s[-1] * 1000, 1) if self.latencies_s else 0.0,
                "dropped": self.dropped_before_inference, "inferred": self.inferred, "displayed": self.displayed,
                "stage_ms": {k: round(v, 1) for k, v in self.stage_ms.items()}}

    def summary(self) -> str:
        return (f"frames: captured {self.captured} | inferred {self.inferred} | "
                f"skipped (similar) {self.skipped_similar}"
                f" | dropped (stale) {self.dropped_stale} | displayed {self.displayed}\n"
                f"AI {self.fps(self.inferred):.2f} FPS | display {self.fps(self.displayed):.2f} FPS | "
                f"capture→display latency p50 {self.latency_ms(50):.0f} ms, p90 {self.latency_ms(90):.0f} ms, "
                f"p99 {self.latency_ms(99):.0f} ms | {self.elapsed_s:.1f} s ({self.stop_reason})")
