"""The backend registry: every implementation of attention, what it can serve, and the order in
which `implementation=None` tries them.

A backend is one module here defining `BACKEND = Backend(...)`: a name, its
`forward(ops) -> (out, logsumexp)` (logsumexp natural log, `(B, T, N)`, float32 or float64) and
`backward(ops, out, logsumexp, dout, dlogsumexp) -> cotangent of ops` (recomputing from the
residuals; None: plain autodiff of the forward), and `unsupported(ops) -> str | None` saying why
it cannot serve a call (None: it can). A backend whose backward is not bitwise reproducible run to
run (atomic adds, a GPU scatter-add) declines `ops.statics.deterministic` there (the user's
`deterministic=True`) or runs a deterministic variant for it (mosaic turns its optional
single-kernel backward off); every default backward is deterministic.
`Backend.run` is the differentiable op (one custom_vjp for every backend, here); `Backend.grads` is
the backward alone, for callers that combine partial attentions (split-KV, ring attention: the
global out and logsumexp are the residuals of every part). A new backend is one new module and one
line in `_MODULES`; the shared test suite (tests/test_suite.py) then runs every case through it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.operands import KvSource, Operands

Forward = Callable[[Operands], tuple[jax.Array, jax.Array]]
Backward = Callable[[Operands, jax.Array, jax.Array, jax.Array, jax.Array | None], Operands]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation. `platforms`: where `implementation=None` may pick it. `kernels`: it runs
    Pallas kernels, so the GPU tier runs the shared suite through it compiled (the XLA paths run
    the same code on CPU and GPU, and the CPU tier covers them)."""

    name: str
    forward: Forward
    backward: Backward | None
    unsupported: Callable[[Operands], str | None]
    platforms: tuple[str, ...]
    description: str
    kernels: bool = False
    pages: bool = False  # reads a paged KV cache (Operands.page_table) itself; else gathered
    # `forward(ops, kv_source)` reading ops' K and V in place from a `KvSource` where it can (a
    # ring's travelling K/V: no copies of the pieces); None: the ring passes the pieces.
    forward_in_place: Callable[[Operands, KvSource], tuple[jax.Array, jax.Array]] | None = None

    def forward_from(self, ops: Operands, kv_source: KvSource | None):
        """`forward(ops)`, reading K/V in place from `kv_source` when given and supported."""
        if kv_source is None or self.forward_in_place is None:
            return self.forward(ops)
        return self.forward_in_place(ops, kv_source)

    def run(self, ops: Operands) -> tuple[jax.Array, jax.Array]:
        """`(out, logsumexp)`, differentiable: the backward recomputes from (out, logsumexp)."""
        if self.backward is None:
            return _forward_once(self, ops)
        return _attend(self, ops)

    def grads(self, ops: Operands, out, lse, dout, dlse) -> Operands:
        """The cotangent of `ops` given the residuals `(out, lse)` and their cotangents."""
        if self.backward is not None:
            return self.backward(ops, out, lse, dout, dlse)
        _, vjp = jax.vjp(self.forward, ops)
        return vjp((dout, dlse))[0]


# The forward and backward each behind one `jax.jit` (the backend static): calls of one shape
# and statics, e.g. a model's layers, share one trace and one lowered function per program, so
# the Pallas kernels are lowered once, not once per call site (GPT-2's 12 layers lowered their
# Mosaic kernels 12 times: ~1.4 s a layer on the CPU, session 31).
@functools.partial(jax.jit, static_argnums=0)
def _forward_once(backend: Backend, ops: Operands) -> tuple[jax.Array, jax.Array]:
    return backend.forward(ops)


@functools.partial(jax.jit, static_argnums=0)
def _backward_once(backend: Backend, ops: Operands, out, lse, dout, dlse) -> Operands:
    return backend.backward(ops, out, lse, dout, dlse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(backend: Backend, ops: Operands) -> tuple[jax.Array, jax.Array]:
    return _forward_once(backend, ops)


def _attend_fwd(backend: Backend, ops: Operands):
    out, lse = _forward_once(backend, ops)
    return (out, lse), (ops, out, lse)


def _attend_bwd(backend: Backend, residuals, cotangents):
    ops, out, lse = residuals
    return (_cotangents_like(_backward_once(backend, ops, out, lse, *cotangents), ops),)


def _cotangents_like(grads: Operands, ops: Operands) -> Operands:
    """A custom_vjp's cotangents must have the primals' types: inside `jax.shard_map`, a Pallas
    kernel's outputs vary over no mesh axis, the primals over the sharded ones."""

    def keep(g, p):
        return g if jnp.dtype(g.dtype) == jax.dtypes.float0 else varying_like(g, p)

    return jax.tree.map(keep, grads, ops)


def varying_like(tree, ref: jax.Array):
    """`tree` (arrays) typed as varying over every manual mesh axis that `ref` varies over (inside
    `jax.shard_map` with check_vma; a no-op outside): for loop carries created inside a kernel
    path and for kernel outputs."""
    axes = _varying(ref)

    def cast(x):
        missing = tuple(axes - _varying(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _varying(x) -> frozenset:
    return jax.typeof(x).manual_axis_type.varying


_attend.defvjp(_attend_fwd, _attend_bwd)


# Preference order for implementation=None: the first that runs on the platform and serves the
# call wins. (Explicit names may run anywhere they support, e.g. the kernels interpreted on CPU.)
_MODULES = ("decode", "mosaic", "triton", "chunked", "xla")

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
