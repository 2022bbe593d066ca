"""The shapes of a sweep, their random inputs, and the slice the reference checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from flashjax.bench import flops

MAX_CHECKED_BATCH = 2
DTYPES: dict[str, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked shape: q, k, v and dO all `(batch, seq, heads, head_dim)` in `dtype`."""

    batch: int
    seq: int
    heads: int
    head_dim: int
    causal: bool
    dtype: str = "bfloat16"
    window: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`(B, T, N, H)`."""
        return (self.batch, self.seq, self.heads, self.head_dim)

    @property
    def label(self) -> str:
        """A short id, e.g. `B8-T2048-N16-H128-causal`."""
        parts = [f"B{self.batch}", f"T{self.seq}", f"N{self.heads}", f"H{self.head_dim}"]
        parts.append("causal" if self.causal else "full")
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        return "-".join(parts)

    def flops(self, mode: str) -> float:
        """FLOPs of one call in `mode` ("fwd", "bwd", "fwd+bwd"), see `flops.attention_flops`."""
        return flops.attention_flops(
            self.batch,
            self.heads,
            self.seq,
            self.seq,
            self.head_dim,
            causal=self.causal,
            window=self.window,
            mode=mode,
        )

    def score_bytes(self) -> int:
        """Bytes of one float32 `(B, N, T, S)` score matrix (what standard attention builds)."""
        return self.batch * self.heads * self.seq * self.seq * 4


def sweep_cases(
    seqlens: Iterable[int],
    head_dims: Iterable[int],
    causal: Iterable[bool],
    *,
    batch_tokens: int,
    hidden: int,
    dtype: str = "bfloat16",
    window: int | tuple[int, int] | None = None,
) -> list[Case]:
    """The protocol's grid: `batch = batch_tokens // seq`, `heads = hidden // head_dim` (each >= 1).

    Longest sequences first (the headline numbers; a run cut short by `--max-minutes` loses the
    short ones), then head dim, then causal.
    """
    cases = []
    for seq in sorted(set(seqlens), reverse=True):
        for head_dim in head_dims:
            for is_causal in causal:
                cases.append(
                    Case(
                        batch=max(1, batch_tokens // seq),
                        seq=seq,
                        heads=max(1, hidden // head_dim),
                        head_dim=head_dim,
                        causal=is_causal,
                        dtype=dtype,
                        window=flops.normalize_window(window, is_causal),
                    )
                )
    return cases


def make_inputs(case: Case, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Standard-normal q, k, v and output cotangent dO, `(B, T, N, H)` in the case's dtype.

    Drawn in float32 and rounded, in one jitted program per array, so no float32 copy is ever
    held (at a million tokens it would be as large as the attention's own operands)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(case.dtype)
    draw = jax.jit(lambda k: jax.random.normal(k, case.shape, jnp.float32).astype(dtype))
    return jax.block_until_ready(tuple(draw(k) for k in keys))


def reference_slice(case: Case, budget_bytes: int) -> tuple[int, int]:
    """`(batch, heads)` of the leading slice the reference checks within `budget_bytes`.

    Heads and batch elements are independent, so the first `b` batch elements and `n` heads of a
    backend's output (and gradients) must equal the reference run on the same slice of the inputs.
    The reference's float32 forward+backward holds about four `(T, S)` matrices per head. At most
    `MAX_CHECKED_BATCH` batch elements: more would only slow the comparison on the host.
    """
    per_head = 4 * case.seq * case.seq * 4
    heads = max(1, min(case.heads, budget_bytes // per_head))
    batch = max(1, min(case.batch, MAX_CHECKED_BATCH, budget_bytes // (per_head * heads)))
    return batch, heads
