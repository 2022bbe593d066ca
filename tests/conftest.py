"""Test setup: eight host devices (pmap / shard_map tests take the first two; ring attention runs
on 4 and 8), the GPU marker, and the Mosaic GPU interpreter's race detector checked after every
test."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`-m gpu` tests need a GPU: without one they are reported as skipped, never passed."""
    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_shared_memory_race(monkeypatch):
    """Off the GPU the Mosaic kernels run in the interpreter with its race detector on
    (`mosaic.api.interpret_params`). The interpreter starts a fresh detector state for each
    kernel and keeps only the last one (`get_races()`); every state a test's kernels start is
    kept here instead, and a race in any of them fails the test."""
    states = []

    class Kept(gpu_callbacks.GPURaceDetectionState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            states.append(self)

    monkeypatch.setattr(gpu_callbacks, "GPURaceDetectionState", Kept)
    yield
    raced = sum(state.races_found for state in states)
    assert not raced, f"the Mosaic GPU interpreter found races in {raced} of {len(states)} kernels"
