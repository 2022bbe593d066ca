"""The implementations `--sparsity` compares, each handed the same block pattern in its own form.

  flashjax          `flashjax.dot_product_attention(..., block_mask=BlockMask, implementation=
                    "triton")`: the kernels walk only the non-empty blocks (interpreted on CPU)
  flashjax_chunked  the same call with `implementation="xla_chunked"` (what a CPU runs)
  jax_xla           `jax.nn.dot_product_attention(..., mask=bm.to_dense(), implementation="xla")`:
                    standard attention with the equivalent dense bool mask, skipping nothing
  torch_flex        PyTorch FlexAttention: `create_block_mask` from a `mask_mod` that indexes the
                    same block pattern (and the causal rule), `flex_attention` under
                    `torch.compile` (needs torch with CUDA)

tokamax is not here: `tokamax.dot_product_attention` takes only a dense bool `mask` (as jax.nn),
and its kernels read that mask per tile without skipping masked blocks (openxla/tokamax,
`_src/ops/attention/api.py` and `pallas_triton_flash_attention.py`), so it has no block-sparse
attention to measure (`TOKAMAX_SKIPPED`).

A backend binds one shape's inputs into a `SparseRunner`. Its programs ("fwd", "fwd_bwd") take
the mask as an argument, so one compiled program serves every pattern of a shape (the dense
reference, without a mask, is a second program).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.bench import backends, timing
from flashjax.bench.cases import Case
from flashjax.bench.sparsity_patterns import Pattern

Inputs = backends.Inputs
TOKAMAX_SKIPPED = (
    "tokamax.dot_product_attention takes a dense bool mask only and skips no masked block "
    "(no block-sparse attention to measure)"
)


class SparseRunner(abc.ABC):
    """One backend bound to one shape's inputs; patterns are given per call."""

    measure: timing.Measure = staticmethod(timing.measure_jax)

    @abc.abstractmethod
    def prepare(self, kind: str, pattern: Pattern) -> None:
        """Compile (or first-run) the program that serves `pattern` (dense or masked)."""

    @abc.abstractmethod
    def program(self, kind: str, pattern: Pattern) -> Callable[[], Any]:
        """The prepared program bound to the inputs and `pattern`'s mask, ready to time."""

    @abc.abstractmethod
    def output(self, pattern: Pattern) -> np.ndarray:
        """The forward's output for `pattern`, batch row 0 and head 0: float32 `(1, T, 1, H)`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop compiled programs and device buffers."""


@dataclasses.dataclass(frozen=True)
class SparseBackend:
    """An implementation under test: how to bind a shape, whether it runs here, what it skips.

    `compile_lane`: "parallel" (compiles run nothing on the device: Pallas), "serial" (XLA
    autotunes on the device; torch.compile is not thread-safe), as in `backends.Backend`.
    """

    name: str
    description: str
    bind: Callable[[Case, Inputs], SparseRunner]
    unavailable: Callable[[], str | None] = lambda: None
    limit: Callable[[Case], str | None] = lambda case: None
    compile_lane: str = "serial"


# --------------------------------------------------------------------------------------------------
# JAX: one jitted program per (kind, masked), the mask an argument
# --------------------------------------------------------------------------------------------------

# attention(q, k, v, mask operand or None, case) -> out
SparseAttention = Callable[[jax.Array, jax.Array, jax.Array, Any, Case], jax.Array]
# The mask operand of a pattern for a shape (None: no mask).
Operand = Callable[[Pattern, Case], Any]


class JaxSparseRunner(SparseRunner):
    """Compiles `fwd(q, k, v, mask)` and `fwd_bwd(q, k, v, dO, mask)`, dense and masked."""

    def __init__(self, attention: SparseAttention, operand: Operand, case: Case, inputs: Inputs):
        self._attention, self._operand, self._case = attention, operand, case
        self._inputs = inputs
        self._compiled: dict[tuple[str, bool], Any] = {}
        self._current: tuple[str, Any] | None = None  # the last pattern's operand (one at a time)

    def _mask(self, pattern: Pattern) -> Any:
        if self._current is None or self._current[0] != pattern.label:
            self._current = None  # free the previous operand first (dense masks are large)
            self._current = (pattern.label, self._operand(pattern, self._case))
        return self._current[1]

    def _fn(self, kind: str) -> Callable:
        attention, case = self._attention, self._case

        def fwd(q, k, v, mask):
            return attention(q, k, v, mask, case)

        def fwd_bwd(q, k, v, do, mask):
            out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask, case), q, k, v)
            return (out, *pullback(do))

        return fwd if kind == "fwd" else fwd_bwd

    def _args(self, kind: str) -> tuple:
        q, k, v, do = self._inputs
        return (q, k, v) if kind == "fwd" else (q, k, v, do)

    def prepare(self, kind: str, pattern: Pattern) -> None:
        """Safe to call from several threads at once (for different keys): the operand it
        lowers with is its own, not the cached one `program` uses."""
        key = (kind, pattern.mask is not None)
        if key not in self._compiled:
            mask = self._operand(pattern, self._case)
            lowered = jax.jit(self._fn(kind)).lower(*self._args(kind), mask)
            self._compiled[key] = lowered.compile()

    def program(self, kind: str, pattern: Pattern) -> Callable[[], Any]:
        self.prepare(kind, pattern)
        compiled, args = self._compiled[(kind, pattern.mask is not None)], self._args(kind)
        mask = self._mask(pattern)
        return lambda: compiled(*args, mask)

    def output(self, pattern: Pattern) -> np.ndarray:
        out = self.program("fwd", pattern)()
        return np.asarray(jax.device_get(out[:1, :, :1]), np.float32)

    def close(self) -> None:
        self._compiled.clear()
        self._current = None


def _flashjax_attention(implementation: str) -> SparseAttention:
    def attention(q, k, v, block_mask, case: Case):
        from flashjax.attention import dot_product_attention

        return dot_product_attention(
            q, k, v, is_causal=case.causal, block_mask=block_mask, implementation=implementation
        )

    return attention


def _block_mask(pattern: Pattern, case: Case) -> Any:
    return pattern.mask


def _xla_attention(q, k, v, mask, case: Case):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=case.causal, implementation="xla"
    )


def _dense_mask(pattern: Pattern, case: Case) -> jax.Array | None:
    """The block pattern as the element mask jax.nn takes, `(1, 1, T, S)` bool."""
    return None if pattern.mask is None else pattern.mask.to_dense(case.seq, case.seq)


def xla_limit(max_bytes: int) -> Callable[[Case], str | None]:
    """Skip standard attention where its float32 scores and the dense mask exceed `max_bytes`."""

    def limit(case: Case) -> str | None:
        need = case.score_bytes() + case.seq * case.seq
        if need > max_bytes:
            return (
                f"float32 scores and the dense mask need {need / 2**30:.1f} GiB > "
                f"{max_bytes / 2**30:.0f} GiB (--xla-max-gib)"
            )
        return None

    return limit


def jax_backend(name: str, implementation: str, description: str, **kw) -> SparseBackend:
    """flashjax with a block mask (`implementation` "triton" or "xla_chunked")."""
    attention = _flashjax_attention(implementation)
    return SparseBackend(
        name,
        description,
        lambda case, inputs: JaxSparseRunner(attention, _block_mask, case, inputs),
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# PyTorch FlexAttention
# --------------------------------------------------------------------------------------------------


FLEX_RECOMPILE_LIMIT = 64  # torch.compile's default (8) would fall back to eager mid-run


@functools.cache
def _compiled_flex() -> Callable:
    """`flex_attention` under `torch.compile`, specialized to each shape (`dynamic=False`)."""
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(blocks: Any, causal: Any, block: int) -> Callable:
    """FlexAttention's `mask_mod`: the block pattern `blocks` `(Tb, Sb)` bool, ANDed with the
    causal rule where the 0-d bool tensor `causal` holds. Both are tensors the function closes
    over, so every pattern, causal or not, of one shape runs one compiled kernel."""

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[q_idx // block, kv_idx // block] & ((q_idx >= kv_idx) | ~causal)

    return mask_mod


def flex_block_mask(pattern: Pattern, case: Case) -> Any:
    """The torch `BlockMask` of `pattern` at `case`'s length; dense is every block kept (its
    blocks are all full, so the element rule never runs there)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    n = -(-case.seq // pattern.block)
    blocks = np.ones((n, n), bool) if pattern.blocks is None else pattern.blocks
    mask_mod = _mask_mod(
        torch.as_tensor(blocks, device="cuda"),
        torch.tensor(case.causal, device="cuda"),
        pattern.block,
    )
    shape = dict(B=None, H=None, Q_LEN=case.seq, KV_LEN=case.seq, device="cuda")
    try:
        return create_block_mask(mask_mod, **shape, BLOCK_SIZE=pattern.block, _compile=True)
    except TypeError:  # a torch without the `_compile` argument
        return create_block_mask(mask_mod, **shape, BLOCK_SIZE=pattern.block)


class FlexRunner(SparseRunner):
    """FlexAttention on `(B, N, T, H)` copies of the inputs, timed with CUDA events."""

    measure = staticmethod(timing.measure_torch)

    def __init__(self, case: Case, inputs: Inputs) -> None:
        import torch

        self._torch, self._case = torch, case
        q, k, v, do = (backends.to_torch(x) for x in inputs)
        self._q, self._k, self._v = (x.requires_grad_(True) for x in (q, k, v))
        self._do = do
        self._current: tuple[str, Any] | None = None
        torch.cuda.synchronize()

    def _mask(self, pattern: Pattern) -> Any:
        if self._current is None or self._current[0] != pattern.label:
            self._current = None
            self._current = (pattern.label, flex_block_mask(pattern, self._case))
        return self._current[1]

    def _run(self, kind: str, block_mask: Any) -> tuple:
        flex = _compiled_flex()
        if kind == "fwd":
            with self._torch.no_grad():
                return (flex(self._q, self._k, self._v, block_mask=block_mask),)
        out = flex(self._q, self._k, self._v, block_mask=block_mask)
        return (out, *self._torch.autograd.grad(out, (self._q, self._k, self._v), self._do))

    def prepare(self, kind: str, pattern: Pattern) -> None:
        self._run(kind, self._mask(pattern))
        self._torch.cuda.synchronize()

    def program(self, kind: str, pattern: Pattern) -> Callable[[], Any]:
        mask = self._mask(pattern)
        return lambda: self._run(kind, mask)

    def output(self, pattern: Pattern) -> np.ndarray:
        (out,) = self._run("fwd", self._mask(pattern))
        return out[:1, :1].transpose(1, 2).float().cpu().numpy()

    def close(self) -> None:
        self._q = self._k = self._v = self._do = self._current = None
        self._torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


def flex_limit(head_dims: tuple[int, ...] | None) -> Callable[[Case], str | None]:
    """Run FlexAttention only at `head_dims` (None: all): each new shape costs it a
    `torch.compile` of the forward and of the backward."""

    def limit(case: Case) -> str | None:
        if head_dims is None or case.head_dim in head_dims:
            return None
        dims = ",".join(map(str, head_dims))
        return f"FlexAttention runs at head dims {dims} only (--flex-head-dims)"

    return limit


def all_backends(
    xla_max_bytes: int = backends.DEFAULT_XLA_MAX_BYTES,
    flex_head_dims: tuple[int, ...] | None = None,
) -> list[SparseBackend]:
    """Every backend `--sparsity` knows, in table order (available here or not)."""
    return [
        jax_backend(
            "flashjax",
            "triton",
            "flashjax block-sparse Pallas kernels (interpreted on CPU)",
            unavailable=backends.flashjax_triton,
            compile_lane="parallel",
        ),
        jax_backend(
            "flashjax_chunked",
            "xla_chunked",
            "flashjax block-sparse pure-JAX loops (what a CPU runs)",
        ),
        SparseBackend(
            "jax_xla",
            "jax.nn XLA attention with the dense bool mask (skips nothing)",
            lambda case, inputs: JaxSparseRunner(_xla_attention, _dense_mask, case, inputs),
            limit=xla_limit(xla_max_bytes),
        ),
        SparseBackend(
            "torch_flex",
            "PyTorch FlexAttention, create_block_mask from the same block pattern, torch.compile",
            FlexRunner,
            unavailable=backends.torch_cuda,
            limit=flex_limit(flex_head_dims),
        ),
    ]


NAMES: tuple[str, ...] = tuple(b.name for b in all_backends())
GPU_DEFAULT = ("flashjax", "jax_xla", "torch_flex")
CPU_DEFAULT = ("flashjax", "flashjax_chunked", "jax_xla")


def reference_output(pattern: Pattern, case: Case, inputs: Inputs) -> np.ndarray:
    """Standard attention in float32 at the highest precision on batch row 0 and head 0, with
    `pattern`'s dense mask: what every backend's forward is checked against."""
    q, k, v = (x[:1, :, :1].astype(jnp.float32) for x in inputs[:3])
    with jax.default_matmul_precision("highest"):
        out = _xla_attention(q, k, v, _dense_mask(pattern, case), case)
    return np.asarray(jax.device_get(out), np.float32)
