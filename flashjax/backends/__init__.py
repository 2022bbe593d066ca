"""The backend registry: every implementation of attention, what it can serve, and the order in
which `implementation=None` tries them.

A backend is one module here defining `BACKEND = Backend(...)`: a name, a differentiable
`run(ops) -> (out, logsumexp)` (its own custom_vjp; logsumexp natural log, `(B, T, N)`, float32 or
float64), and `unsupported(ops) -> str | None` saying why it cannot serve a call (None: it can).
A new backend is one new module and one line in `_MODULES`; the shared test suite
(tests/test_suite.py) then runs every case through it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax

from pallas_kernels.operands import Operands

Run = Callable[[Operands], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation. `platforms`: where `implementation=None` may pick it. `kernels`: it runs
    Pallas kernels, so the GPU tier runs the shared suite through it compiled (the XLA paths run
    the same code on CPU and GPU, and the CPU tier covers them)."""

    name: str
    run: Run
    unsupported: Callable[[Operands], str | None]
    platforms: tuple[str, ...]
    description: str
    kernels: bool = False


# Preference order for implementation=None: the first that runs on the platform and serves the
# call wins. (Explicit names may run anywhere they support, e.g. the kernels interpreted on CPU.)
_MODULES = ("triton", "chunked", "xla")

REGISTRY: dict[str, Backend] = {}
for _module in _MODULES:
    _backend = importlib.import_module(f"flashjax.backends.{_module}").BACKEND
    REGISTRY[_backend.name] = _backend

NAMES: tuple[str, ...] = tuple(REGISTRY)


def platform() -> str:
    return jax.devices()[0].platform


def choose(implementation: str | None, ops: Operands) -> Backend:
    """The backend that runs `ops`: the one named (raising, naming the feature, if it cannot serve
    the call), or the first in preference order that serves it on this platform."""
    if implementation is not None:
        if implementation not in REGISTRY:
            raise ValueError(
                f"implementation must be one of {NAMES} or None, got {implementation!r}"
            )
        backend = REGISTRY[implementation]
        why = backend.unsupported(ops)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot serve this call: {why}")
        return backend
    here = platform()
    for backend in REGISTRY.values():
        if here in backend.platforms and backend.unsupported(ops) is None:
            return backend
    raise ValueError(f"no implementation serves this call on platform {here!r}")  # pragma: no cover
