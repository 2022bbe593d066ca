"""Inputs and the tolerance rule of DESIGN.md, shared by the test files."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax import BlockMask, backends, dot_product_attention
from flashjax.attention import operands


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype and keyword features. `id` reads like B2-T77-S190-..."""

    B: int = 2
    T: int = 77
    S: int = 190
    N: int = 4
    K: int = 2
    H: int = 40
    dtype: str = "bfloat16"
    features: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        tail = "-".join(self.features) or "plain"
        return f"B{self.B}-T{self.T}-S{self.S}-N{self.N}-K{self.K}-H{self.H}-{self.dtype}-{tail}"


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def make_inputs(case: Case, salt: str = ""):
    """Fresh random q, k, v, dout (never zeros) and the keyword arguments of the case's features."""
    rng = np.random.default_rng(seed_of(case.id + salt))
    dt = jnp.dtype(case.dtype)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dt)

    q = normal(case.B, case.T, case.N, case.H)
    k = normal(case.B, case.S, case.K, case.H)
    v = normal(case.B, case.S, case.K, case.H)
    dout = normal(case.B, case.T, case.N, case.H)
    kw: dict = {}
    for f in case.features:
        if f == "causal":
            kw["is_causal"] = True
        elif f == "window":
            kw["local_window_size"] = (int(rng.integers(3, 20)), int(rng.integers(0, 12)))
        elif f == "softcap":
            kw["logits_soft_cap"] = 3.0
        elif f == "bias":
            kw["bias"] = jnp.asarray(rng.standard_normal((1, case.N, case.T, case.S)), jnp.float32)
        elif f == "rowbias":  # broadcast along queries: (B, 1, 1, S)
            kw["bias"] = jnp.asarray(rng.standard_normal((case.B, 1, 1, case.S)), jnp.float32)
        elif f == "colbias":  # broadcast along keys, one value per (head, query): (1, N, T, 1)
            kw["bias"] = jnp.asarray(rng.standard_normal((1, case.N, case.T, 1)), jnp.float32)
        elif f == "headbias":  # one value per (batch row, head): (B, N, 1, 1)
            kw["bias"] = jnp.asarray(rng.standard_normal((case.B, case.N, 1, 1)), jnp.float32)
        elif f == "mask":
            kw["mask"] = jnp.asarray(rng.random((case.B, 1, case.T, case.S)) > 0.3)
        elif f == "segments":
            kw["q_segment_ids"] = jnp.asarray(
                np.sort(rng.integers(0, 3, (case.B, case.T))), jnp.int32
            )
            kw["kv_segment_ids"] = jnp.asarray(
                np.sort(rng.integers(0, 3, (case.B, case.S))), jnp.int32
            )
        elif f == "lengths":
            kw["query_seq_lengths"] = jnp.asarray(rng.integers(1, case.T + 1, case.B), jnp.int32)
            kw["key_value_seq_lengths"] = jnp.asarray(
                rng.integers(1, case.S + 1, case.B), jnp.int32
            )
        elif f == "large":  # logits of std ~100: many rows see only logits far below -88
            q = q * 100
        elif f == "dropout":
            kw["dropout_rate"] = 0.2
            kw["dropout_rng"] = jax.random.PRNGKey(seed_of(case.id))
        elif f == "offsets":  # positions of row 0 / key 0 per batch row (decode, ring shards)
            kw["q_offsets"] = jnp.asarray(rng.integers(0, 40, case.B), jnp.int32)
            kw["kv_offsets"] = jnp.asarray(rng.integers(0, 40, case.B), jnp.int32)
        elif f == "blocks":  # a random (B, N, Tb, Sb) block mask of 16 x 32 blocks
            shape = (case.B, case.N, -(-case.T // 16), -(-case.S // 32))
            kw["block_mask"] = BlockMask.from_blocks(jnp.asarray(rng.random(shape) < 0.6), (16, 32))
        elif f == "blocks128":  # a random (B, 1, Tb, Sb) mask of 128-blocks: whole CTA tiles
            shape = (case.B, 1, -(-case.T // 128), -(-case.S // 128))
            kw["block_mask"] = BlockMask.from_blocks(jnp.asarray(rng.random(shape) < 0.7), 128)
        elif f == "maskfn":  # an element rule per head, classified into 32 x 16 blocks
            kw["block_mask"] = BlockMask.from_mask_fn(
                _mask_fn, case.T, case.S, block_size=(32, 16), heads=case.N
            )
        elif f == "garbage":  # NaN past the lengths (a padded cache): must reach nothing
            q_len, kv_len = kw["query_seq_lengths"], kw["key_value_seq_lengths"]
            q = jnp.where(
                jnp.arange(case.T)[None, :, None, None] < q_len[:, None, None, None], q, jnp.nan
            )
            past = jnp.arange(case.S)[None, :, None, None] >= kv_len[:, None, None, None]
            k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)
        else:
            raise ValueError(f)
    return q, k, v, dout, kw


def _mask_fn(b, h, i, j):
    """A FlexAttention-style element rule: a causal band whose width depends on the head, with
    holes (so blocks come out empty, partial and full)."""
    return (j <= i + 8 * h) & (j >= i - 40) & ((i + 2 * j) % 7 != 0)


def cannot_serve(impl: str, q, k, v, kw) -> str | None:
    """Why the registered backend `impl` cannot serve this call (None if it can)."""
    call = {n: x for n, x in kw.items()}
    return backends.REGISTRY[impl].unsupported(operands(q, k, v, **call))


def served(impl: str, q, k, v, kw) -> bool:
    """Whether the registered backend `impl` says it serves this call; where it does not, naming
    it must raise the "cannot serve" error (checked here), and the caller checks nothing else."""
    if cannot_serve(impl, q, k, v, kw) is None:
        return True
    with pytest.raises(ValueError, match="cannot serve"):
        dot_product_attention(q, k, v, implementation=impl, **kw)
    return False


def run(impl: str, q, k, v, dout, kw):
    """(out, logsumexp, dq, dk, dv) of one implementation; the loss also reads the logsumexp.

    The whole computation is one jitted program: op by op, every op of the naive references
    and of the interpreted kernels compiles and dispatches separately (a small suite case took
    22-28 s eagerly on the CPU, 5-10 s jitted)."""

    def f(q, k, v):
        return dot_product_attention(q, k, v, implementation=impl, return_residual=True, **kw)

    def values_and_grads(q, k, v, dout):
        (out, lse), vjp = jax.vjp(f, q, k, v)
        dlse = jnp.where(jnp.isfinite(lse), 0.1, 0.0).astype(lse.dtype)
        return (out, lse, *vjp((dout.astype(out.dtype), dlse)))

    return jax.jit(values_and_grads)(q, k, v, dout)


def run_reference64(q, k, v, dout, kw):
    """The float64 ground truth (the naive reference on upcast inputs)."""
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, dout)]
        kw64 = {
            n: (jnp.asarray(np.asarray(x, np.float64)) if n in ("bias", "scale") else x)
            for n, x in kw.items()
        }
        return [np.asarray(x, np.float64) for x in run("xla", *up, kw64)]


NAMES = ("out", "lse", "dq", "dk", "dv")


def assert_close(got, naive, ref64, *, label: str = "") -> None:
    """DESIGN.md's rule: max error <= 2x the naive same-dtype error (3x for gradients) + tiny atol.

    Every element must be finite wherever the float64 reference is (unwritten or NaN outputs fail).
    """
    for name, g, n, r in zip(NAMES, got, naive, ref64):
        g = np.asarray(g, np.float64)
        n = np.asarray(n, np.float64)
        finite = np.isfinite(r)
        assert np.array_equal(np.isfinite(g), finite), f"{label} {name}: non-finite mismatch"
        assert np.array_equal(g[~finite], r[~finite]), f"{label} {name}: inf mismatch"
        err = np.max(np.abs(g[finite] - r[finite]), initial=0.0)
        naive_err = np.max(np.abs(n[finite] - r[finite]), initial=0.0)
        factor = 2.0 if name in ("out", "lse") else 3.0
        atol = 1e-5 * max(1.0, np.max(np.abs(r[finite]), initial=0.0))
        assert err <= factor * naive_err + atol, (
            f"{label} {name}: max err {err:.3e} > {factor} x naive {naive_err:.3e} + {atol:.1e}"
        )
