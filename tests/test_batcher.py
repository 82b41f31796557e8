"""The stream batcher: a stream's loop hands in frame N+1 before it collects frame N (one in flight); both come
back, in order, each what the stream gets alone — and a batcher that fails answers every waiting stream."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_sdxs.backends.batcher import BatcherStopped, StreamBatcher
from mlx_sdxs.pipeline import SDXSPipeline
from mlx_sdxs.recipe import RecipeSettings

SETTINGS = RecipeSettings(render_size=64, feedback=0.3)


def _frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.timeout(120)
def test_frames_handed_in_before_the_last_is_collected_come_back_in_order_as_alone():
    pipe = SDXSPipeline.random("random-tiny")
    frames = _frames(3)
    alone = pipe.stream(SETTINGS, "a fox")
    expected = [alone.process(frame) for frame in frames]  # feedback: each frame depends on the one before

    batcher = StreamBatcher(pipe.stream(SETTINGS), streams=2)
    batcher.start()
    try:
        batcher.host.set_prompt("a fox")
        other = batcher.open(RecipeSettings(render_size=64, seed=7))
        other.set_prompt("a whale")
        pending = [batcher.host.submit(frame) for frame in frames]  # all handed in before any is collected
        other_pending = other.submit(frames[0])
        got = [batcher.host.collect(handle) for handle in pending]
        other.collect(other_pending)
    finally:
        batcher.host.close()
    for frame, (want, have) in enumerate(zip(expected, got)):
        # One level: a batch of two may sum in another order (OpenBLAS picks its kernel by size; see test_streams).
        assert np.abs(have.astype(int) - want).max() <= 1, f"frame {frame}"
    with pytest.raises(BatcherStopped):
        batcher.host.submit(frames[0])
