"""Test setup: eight host devices (pmap / shard_map tests take the first two; ring attention runs
on 4 and 8) and the GPU marker."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`-m gpu` tests need a GPU: without one they are reported as skipped, never passed."""
    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
