"""The attention implementations a sweep compares, each usable only where it is available.

A `Backend` says whether it can run here at all (`unavailable`) and on a given case
(`unsupported`), and binds a case's inputs into a `Runner` that compiles, runs once for the check
and times the two programs every mode derives from: "fwd" (the forward) and "fwd_bwd" (one jitted
`vjp`: forward and backward; the backward's time is their difference).

Backends, in table order:
  flashjax          `flashjax.dot_product_attention(implementation="triton")` (interpreted on CPU)
  flashjax_mosaic   `flashjax.dot_product_attention(implementation="mosaic")` (sm90)
  flashjax_chunked  `flashjax.dot_product_attention(implementation="xla_chunked")`
  jax_cudnn         `jax.nn.dot_product_attention(implementation="cudnn")`
  jax_xla           `jax.nn.dot_product_attention(implementation="xla")`: (T, S) scores in memory
  tokamax_triton    `tokamax.dot_product_attention(implementation="triton")`
  tokamax_mosaic    `tokamax.dot_product_attention(implementation="mosaic")` (sm90+)
  torch_cudnn       torch SDPA, cuDNN backend, (B, N, T, H) layout
  torch_flash       torch SDPA, FlashAttention-2 backend, (B, N, T, H) layout
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.bench import timing
from flashjax.bench.cases import Case

Inputs = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, Case], jax.Array]
KINDS: tuple[str, ...] = ("fwd", "fwd_bwd")
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {"fwd": ("out",), "fwd_bwd": ("out", "dq", "dk", "dv")}
DEFAULT_XLA_MAX_BYTES = 20 * 2**30


class Runner(abc.ABC):
    """One backend bound to one case's inputs."""

    @abc.abstractmethod
    def prepare(self, kind: str) -> int | None:
        """Compile (or first-run) program `kind`; its extra device memory in bytes, or None."""

    @abc.abstractmethod
    def run(self, kind: str) -> Any:
        """Launch the prepared program `kind` once (asynchronously where the runtime is)."""

    @abc.abstractmethod
    def outputs(self, kind: str, batch: int, heads: int) -> tuple[np.ndarray, ...]:
        """Run `kind` once: out (and dq, dk, dv) as float32 `(b, T, n, H)`, the leading slice."""

    @abc.abstractmethod
    def time(self, kind: str, policy: timing.TimingPolicy) -> timing.Timing:
        """Time the prepared program `kind`."""

    def peak_bytes(self) -> int | None:
        """Peak device bytes in use so far (None where the runtime does not say)."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the compiled programs and device buffers this runner holds."""


class Backend(abc.ABC):
    """An attention implementation under test."""

    name: str
    description: str
    # When its programs compile (with more than one compile worker): "parallel" in the pool of
    # threads, for programs whose compilation runs nothing on the device (Pallas, cuDNN); "serial"
    # in one extra thread, one program at a time (XLA autotunes its GEMMs on the device: two at
    # once would disturb each other's measurements); "inline" just before the check and timing.
    compile_lane: str = "inline"

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine, or None if it can."""
        return None

    def unsupported(self, case: Case) -> str | None:
        """Why this backend skips `case` (e.g. memory), or None."""
        return None

    @abc.abstractmethod
    def runner(self, case: Case, inputs: Inputs) -> Runner:
        """Bind `case`'s inputs `(q, k, v, dO)`, each `(B, T, N, H)`."""


# --------------------------------------------------------------------------------------------------
# JAX backends: a function of (q, k, v, case), jitted and compiled ahead of time.
# --------------------------------------------------------------------------------------------------


def _temp_bytes(compiled: Any) -> int | None:
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


def _as_tuple(x: Any) -> tuple[jax.Array, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class JaxRunner(Runner):
    """Compiles `fwd(q, k, v)` and `fwd_bwd(q, k, v, dO) = (out, dq, dk, dv)` with `jax.jit`."""

    def __init__(self, attention: AttentionFn, case: Case, inputs: Inputs) -> None:
        q, k, v, do = inputs

        def fwd(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return attention(q, k, v, case)

        def fwd_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple:
            out, pullback = jax.vjp(fwd, q, k, v)
            return (out, *pullback(do))

        self._programs: dict[str, tuple[Callable, tuple]] = {
            "fwd": (fwd, (q, k, v)),
            "fwd_bwd": (fwd_bwd, (q, k, v, do)),
        }
        self._compiled: dict[str, Any] = {}

    def prepare(self, kind: str) -> int | None:
        fn, args = self._programs[kind]
        self._compiled[kind] = jax.jit(fn).lower(*args).compile()
        return _temp_bytes(self._compiled[kind])

    def run(self, kind: str) -> Any:
        return self._compiled[kind](*self._programs[kind][1])

    def outputs(self, kind: str, batch: int, heads: int) -> tuple[np.ndarray, ...]:
        results = _as_tuple(self.run(kind))
        return tuple(
            np.asarray(jax.device_get(x[:batch, :, :heads])).astype(np.float32) for x in results
        )

    def time(self, kind: str, policy: timing.TimingPolicy) -> timing.Timing:
        compiled, args = self._compiled[kind], self._programs[kind][1]
        return timing.median_time(lambda: compiled(*args), timing.measure_jax, policy)

    def peak_bytes(self) -> int | None:
        stats = jax.devices()[0].memory_stats()
        return None if not stats else stats.get("peak_bytes_in_use")

    def close(self) -> None:
        self._compiled.clear()


@dataclasses.dataclass(frozen=True)
class JaxBackend(Backend):
    """A backend given by `attention(q, k, v, case) -> out`, all `(B, T, N, H)`."""

    name: str
    attention: AttentionFn
    description: str = ""
    requires: Callable[[], str | None] = lambda: None
    limit: Callable[[Case], str | None] = lambda case: None
    compile_lane: str = "parallel"

    def unavailable(self) -> str | None:
        return self.requires()

    def unsupported(self, case: Case) -> str | None:
        return self.limit(case)

    def runner(self, case: Case, inputs: Inputs) -> Runner:
        return JaxRunner(self.attention, case, inputs)


# --------------------------------------------------------------------------------------------------
# torch backends: SDPA with one kernel family forced, timed with CUDA events.
# --------------------------------------------------------------------------------------------------


def to_torch(x: jax.Array) -> Any:
    """A `(B, T, N, H)` JAX array as a contiguous `(B, N, T, H)` CUDA tensor (torch's layout),
    shared through DLPack where it can be."""
    import torch

    try:
        t = torch.from_dlpack(x)
    except Exception:  # fall back to a host round trip (only at setup)
        dtype = getattr(torch, jnp.dtype(x.dtype).name)
        t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", dtype=dtype)
    return t.transpose(1, 2).contiguous()


class TorchRunner(Runner):
    """torch SDPA on `(B, N, T, H)` copies of the JAX inputs (shared through DLPack)."""

    def __init__(self, sdp_backend: str, case: Case, inputs: Inputs) -> None:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._torch = torch
        self._sdpa = F.scaled_dot_product_attention
        self._context = lambda: sdpa_kernel(getattr(SDPBackend, sdp_backend))
        self._causal = case.causal
        q, k, v, do = (to_torch(x) for x in inputs)
        self._q, self._k, self._v = (x.requires_grad_(True) for x in (q, k, v))
        self._do = do
        torch.cuda.synchronize()

    def run(self, kind: str) -> tuple:
        torch = self._torch
        if kind == "fwd":
            with torch.no_grad(), self._context():
                return (self._sdpa(self._q, self._k, self._v, is_causal=self._causal),)
        with self._context():
            out = self._sdpa(self._q, self._k, self._v, is_causal=self._causal)
            grads = torch.autograd.grad(out, (self._q, self._k, self._v), self._do)
        return (out.detach(), *grads)

    def prepare(self, kind: str) -> int | None:
        torch = self._torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        results = self.run(kind)
        torch.cuda.synchronize()
        produced = sum(x.numel() * x.element_size() for x in results)
        return max(0, torch.cuda.max_memory_allocated() - base - produced)

    def outputs(self, kind: str, batch: int, heads: int) -> tuple[np.ndarray, ...]:
        return tuple(
            x[:batch, :heads].transpose(1, 2).float().cpu().numpy() for x in self.run(kind)
        )

    def time(self, kind: str, policy: timing.TimingPolicy) -> timing.Timing:
        return timing.median_time(lambda: self.run(kind), timing.measure_torch, policy)

    def peak_bytes(self) -> int | None:
        return int(self._torch.cuda.max_memory_allocated())

    def close(self) -> None:
        self._q = self._k = self._v = self._do = None
        self._torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class TorchBackend(Backend):
    """torch SDPA restricted to `sdp_backend` (a `torch.nn.attention.SDPBackend` name)."""

    name: str
    sdp_backend: str
    description: str = ""

    def unavailable(self) -> str | None:
        return torch_cuda()

    def unsupported(self, case: Case) -> str | None:
        if case.window is not None:
            return "torch SDPA has no sliding window"
        return None

    def runner(self, case: Case, inputs: Inputs) -> Runner:
        return TorchRunner(self.sdp_backend, case, inputs)


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------


def platform() -> str:
    """The platform of the default JAX device: "gpu", "cpu", "tpu", ..."""
    return jax.devices()[0].platform


def _gpu() -> str | None:
    return None if platform() == "gpu" else f"needs a GPU (JAX runs on {platform()})"


def _sm90() -> str | None:
    if (why := _gpu()) is not None:
        return why
    capability = str(getattr(jax.devices()[0], "compute_capability", "0"))
    try:
        major = int(capability.split(".")[0])
    except ValueError:
        major = 0
    return None if major >= 9 else f"needs sm90+ (compute capability {capability})"


def flashjax_triton() -> str | None:
    """Why flashjax's Triton kernels cannot run here, or None (on a CPU they are interpreted)."""
    return None if platform() in ("gpu", "cpu") else f"no Triton kernels on {platform()}"


@functools.cache
def _module(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as e:  # an import can fail in many ways (missing CUDA libraries, versions)
        return f"import {name} failed: {type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def _tokamax() -> str | None:
    return _gpu() or _module("tokamax")


def _tokamax_mosaic() -> str | None:
    return _sm90() or _module("tokamax")


@functools.cache
def torch_cuda() -> str | None:
    """Why torch with a CUDA device is not usable here, or None."""
    if (why := _gpu()) is not None:
        return why
    if (why := _module("torch")) is not None:
        return why
    import torch

    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    return None


# --------------------------------------------------------------------------------------------------
# The attention functions
# --------------------------------------------------------------------------------------------------


def dpa_call(module: str, implementation: str) -> AttentionFn:
    """`module.dot_product_attention` (flashjax, jax.nn and tokamax share jax.nn's signature),
    imported at call time so that a missing package only disables its own backend."""

    def attention(q: jax.Array, k: jax.Array, v: jax.Array, case: Case) -> jax.Array:
        op = importlib.import_module(module).dot_product_attention
        return op(
            q,
            k,
            v,
            is_causal=case.causal,
            local_window_size=case.window,
            implementation=implementation,
        )

    return attention


def _xla_limit(max_bytes: int) -> Callable[[Case], str | None]:
    def limit(case: Case) -> str | None:
        need = case.score_bytes()
        if need > max_bytes:
            return (
                f"float32 scores alone need {need / 2**30:.1f} GiB > {max_bytes / 2**30:.0f} GiB "
                "(--xla-max-gib)"
            )
        return None

    return limit


def all_backends(xla_max_bytes: int = DEFAULT_XLA_MAX_BYTES) -> list[Backend]:
    """Every known backend, in table order (available here or not)."""
    return [
        JaxBackend(
            "flashjax",
            dpa_call("flashjax", "triton"),
            "flashjax Pallas kernels (Triton lowering; interpreted on CPU)",
            flashjax_triton,
        ),
        JaxBackend(
            "flashjax_mosaic",
            dpa_call("flashjax", "mosaic"),
            "flashjax Hopper kernels on Mosaic GPU (a bias or head dim 192: Triton backward)",
            _sm90,
        ),
        JaxBackend(
            "flashjax_chunked",
            dpa_call("flashjax", "xla_chunked"),
            "flashjax pure-JAX blockwise (lax.scan)",
            compile_lane="serial",
        ),
        JaxBackend(
            "jax_cudnn", dpa_call("jax.nn", "cudnn"), "jax.nn.dot_product_attention cuDNN", _gpu
        ),
        JaxBackend(
            "jax_xla",
            dpa_call("jax.nn", "xla"),
            "jax.nn.dot_product_attention XLA (standard attention)",
            limit=_xla_limit(xla_max_bytes),
            compile_lane="serial",
        ),
        JaxBackend(
            "tokamax_triton", dpa_call("tokamax", "triton"), "tokamax Pallas Triton", _tokamax
        ),
        JaxBackend(
            "tokamax_mosaic",
            dpa_call("tokamax", "mosaic"),
            "tokamax Pallas Mosaic GPU",
            _tokamax_mosaic,
        ),
        TorchBackend("torch_cudnn", "CUDNN_ATTENTION", "torch SDPA cuDNN"),
        TorchBackend("torch_flash", "FLASH_ATTENTION", "torch SDPA FlashAttention-2"),
    ]


BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in all_backends())
