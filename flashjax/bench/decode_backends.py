"""The decode steps `--decode` times: flashjax's and the anchors', each runnable only where it is.

A backend binds one shape's `DecodeInputs` into a `DecodeRunner`, which gives batch row 0's
output (for the check) and the seconds per step of `steps` steps run back to back with each
step's query the previous step's output (as in decoding): inside one jitted
`lax.fori_loop` for JAX, inside one CUDA graph for torch, so that dispatch is excluded.

Backends (caches are full, so every one reads the whole cache; the anchors get no lengths):
  flashjax           `flashjax.decode_attention(implementation="triton_decode")`, contiguous
  flashjax_paged<P>  the same on a paged cache, pages of P keys, shuffled page table
  flashjax_triton    `flashjax.dot_product_attention(implementation="triton")` with lengths: the
                     training kernel (where decode steps went before the decode kernel)
  jax_cudnn          `jax.nn.dot_product_attention(implementation="cudnn")`
  jax_xla            `jax.nn.dot_product_attention(implementation="xla")`
  jax_pallas_decode  `jax.experimental.pallas.ops.gpu.decode_attention.gqa` (its defaults)
  tokamax_triton     `tokamax.dot_product_attention(implementation="triton")`
  tokamax_mosaic     `tokamax.dot_product_attention(implementation="mosaic")`
  torch_fa2_kvcache  `flash_attn.flash_attn_with_kvcache` (FlashAttention-2's split-KV decoding)
  torch_sdpa_flash   torch SDPA, FlashAttention backend, `enable_gqa=True`
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import flashjax
from flashjax.bench.backends import _gpu, _module, _sm90, torch_cuda


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """One shape's arrays: `q (B, 1, N, H)`, full caches `k, v (B, S, K, H)`, `lengths (B,)`
    (all S), and per page size P: pools `(pages, P, K, H)` holding the same keys and values
    and a shuffled page table `(B, S / P)`."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    pools: dict[int, tuple[jax.Array, jax.Array, jax.Array]]

    @property
    def cache_bytes(self) -> int:
        """Bytes one step reads from the cache: keys and values, every row, every position."""
        return 2 * self.k.size * self.k.dtype.itemsize


jax.tree_util.register_dataclass(
    DecodeInputs, data_fields=["q", "k", "v", "lengths", "pools"], meta_fields=[]
)

Step = Callable[[jax.Array, DecodeInputs], jax.Array]  # (query (B, 1, N, H), inputs) -> out


class DecodeRunner(abc.ABC):
    """One backend bound to one shape's inputs."""

    @abc.abstractmethod
    def output(self) -> np.ndarray:
        """One step's output of batch row 0, float32 `(1, 1, N, H)`."""

    @abc.abstractmethod
    def seconds_per_step(self, steps: int, reps: int, unroll: int) -> float:
        """The median over `reps` timed runs of `steps` chained steps, per step."""


def median_seconds(run: Callable[[], Any], sync: Callable[[Any], Any], reps: int) -> float:
    sync(run())  # warm-up
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chained_steps(step: Step, q0: jax.Array, x: DecodeInputs, steps: int, unroll: int):
    """`steps` decode steps in one loop, each step's query the previous step's output (same
    shape: a real data dependence with no op of the loop's own between the steps; an update
    `q0 + c * out` cost a fusion of 1.6-3.7 us a step on the H200, session 16)."""

    def body(_, q):
        return step(q, x).astype(q0.dtype)

    return lax.fori_loop(0, steps, body, q0, unroll=max(1, min(unroll, steps)))


class JaxRunner(DecodeRunner):
    def __init__(self, step: Step, x: DecodeInputs) -> None:
        self.step, self.x = step, x

    def output(self) -> np.ndarray:
        out = jax.jit(self.step)(self.x.q, self.x)
        return np.asarray(out[:1], np.float32)

    def seconds_per_step(self, steps: int, reps: int, unroll: int) -> float:
        def loop(q, x):
            return chained_steps(self.step, q, x, steps, unroll)

        compiled = jax.jit(loop).lower(self.x.q, self.x).compile()
        run = lambda: compiled(self.x.q, self.x)  # noqa: E731
        return median_seconds(run, jax.block_until_ready, reps) / steps


class TorchRunner(DecodeRunner):
    """A torch attention on the same device buffers (DLPack); the chained steps are captured in
    one CUDA graph and replayed between two CUDA events."""

    def __init__(self, attention: Callable[[Any], Any], x: DecodeInputs) -> None:
        import torch

        self.torch = torch
        self.attention = attention
        self.q0 = torch.from_dlpack(x.q)

    def output(self) -> np.ndarray:
        with self.torch.no_grad():
            return self.attention(self.q0)[:1].float().cpu().numpy()

    def seconds_per_step(self, steps: int, reps: int, unroll: int) -> float:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture, as CUDA graphs require
                self.attention(self.q0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            q = self.q0
            for _ in range(steps):
                q = self.attention(q)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        graph.replay()
        for _ in range(max(1, reps)):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times) / steps


@dataclasses.dataclass(frozen=True)
class DecodeBackend:
    """A decode-step implementation: `bind(inputs) -> DecodeRunner`, available where
    `requires()` says None."""

    name: str
    description: str
    bind: Callable[[DecodeInputs], DecodeRunner]
    requires: Callable[[], str | None] = lambda: None

    def unavailable(self) -> str | None:
        return self.requires()


def _jax(step: Step) -> Callable[[DecodeInputs], DecodeRunner]:
    return lambda x: JaxRunner(step, x)


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------


def flashjax_step(q: jax.Array, x: DecodeInputs) -> jax.Array:
    return flashjax.decode_attention(q, x.k, x.v, x.lengths, implementation="triton_decode")


def paged_step(page: int) -> Step:
    def step(q: jax.Array, x: DecodeInputs) -> jax.Array:
        k_pool, v_pool, table = x.pools[page]
        return flashjax.decode_attention(
            q, k_pool, v_pool, x.lengths, page_table=table, implementation="triton_decode"
        )

    return step


def flashjax_triton_step(q: jax.Array, x: DecodeInputs) -> jax.Array:
    return flashjax.dot_product_attention(
        q, x.k, x.v, key_value_seq_lengths=x.lengths, implementation="triton"
    )


def jax_nn_step(implementation: str) -> Step:
    def step(q: jax.Array, x: DecodeInputs) -> jax.Array:
        return jax.nn.dot_product_attention(q, x.k, x.v, implementation=implementation)

    return step


def pallas_decode_step(q: jax.Array, x: DecodeInputs) -> jax.Array:
    ops = importlib.import_module("jax.experimental.pallas.ops.gpu.decode_attention")
    return ops.gqa(q[:, 0], x.k, x.v)[:, None]


def tokamax_step(implementation: str) -> Step:
    def step(q: jax.Array, x: DecodeInputs) -> jax.Array:
        tokamax = importlib.import_module("tokamax")
        return tokamax.dot_product_attention(q, x.k, x.v, implementation=implementation)

    return step


def fa2_kvcache(x: DecodeInputs) -> DecodeRunner:
    import torch
    from flash_attn import flash_attn_with_kvcache

    k, v = torch.from_dlpack(x.k), torch.from_dlpack(x.v)
    lengths = torch.from_dlpack(x.lengths)
    return TorchRunner(lambda q: flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths), x)


def sdpa_flash(x: DecodeInputs) -> DecodeRunner:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k, v = (torch.from_dlpack(a).transpose(1, 2) for a in (x.k, x.v))  # (B, K, S, H) views

    def attention(q):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)
        return out.transpose(1, 2)

    return TorchRunner(attention, x)


def _torch_with(module: str) -> Callable[[], str | None]:
    return lambda: torch_cuda() or _module(module)


def all_backends(page_sizes: tuple[int, ...]) -> list[DecodeBackend]:
    """Every decode backend, in table order (available here or not)."""
    paged = [
        DecodeBackend(
            f"flashjax_paged{p}", f"flashjax decode kernel, pages of {p} keys", _jax(paged_step(p))
        )
        for p in page_sizes
    ]
    return [
        DecodeBackend("flashjax", "flashjax.decode_attention (triton_decode)", _jax(flashjax_step)),
        *paged,
        DecodeBackend(
            "flashjax_triton", "flashjax training forward kernel", _jax(flashjax_triton_step)
        ),
        DecodeBackend("jax_cudnn", "jax.nn cuDNN", _jax(jax_nn_step("cudnn")), _gpu),
        DecodeBackend("jax_xla", "jax.nn XLA", _jax(jax_nn_step("xla"))),
        DecodeBackend(
            "jax_pallas_decode", "JAX's Pallas decode op (gqa)", _jax(pallas_decode_step), _gpu
        ),
        DecodeBackend(
            "tokamax_triton",
            "tokamax Triton",
            _jax(tokamax_step("triton")),
            lambda: _gpu() or _module("tokamax"),
        ),
        DecodeBackend(
            "tokamax_mosaic",
            "tokamax Mosaic GPU",
            _jax(tokamax_step("mosaic")),
            lambda: _sm90() or _module("tokamax"),
        ),
        DecodeBackend(
            "torch_fa2_kvcache",
            "FlashAttention-2 flash_attn_with_kvcache",
            fa2_kvcache,
            _torch_with("flash_attn"),
        ),
        DecodeBackend("torch_sdpa_flash", "torch SDPA FlashAttention", sdpa_flash, torch_cuda),
    ]


def names(page_sizes: tuple[int, ...] = (16, 64)) -> tuple[str, ...]:
    return tuple(b.name for b in all_backends(page_sizes))


def loop_overhead_step(q: jax.Array, x: DecodeInputs) -> jax.Array:
    """A step that reads nothing: the loop's own cost per step."""
    return q


def reference_output(x: DecodeInputs) -> np.ndarray:
    """Batch row 0 in float32 with flashjax's naive XLA reference."""
    q, k, v = (a[:1].astype(jnp.float32) for a in (x.q, x.k, x.v))
    with jax.default_matmul_precision("highest"):
        out = flashjax.dot_product_attention(q, k, v, implementation="xla")
    return np.asarray(out, np.float32)
