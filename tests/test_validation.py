"""Bad input raises a clear ValueError / TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flashjax import dot_product_attention

Q = jnp.ones((2, 8, 4, 16), jnp.float32)
KV = jnp.ones((2, 12, 2, 16), jnp.float32)
L = jnp.array([3, 4], jnp.int32)
S = jnp.zeros((2, 8), jnp.int32)
KS = jnp.zeros((2, 12), jnp.int32)
RNG = jax.random.PRNGKey(0)

BAD = {
    "rank": (dict(query=jnp.ones((8, 16))), ValueError, "query must have rank"),
    "mixed-rank": (dict(key=KV[0]), ValueError, "key must have the same rank"),
    "kv-shape": (dict(value=KV[:, :5]), ValueError, "key and value must have the same shape"),
    "batch": (dict(key=KV[:1], value=KV[:1]), ValueError, "same batch size"),
    "head-dim": (dict(key=KV[..., :8], value=KV[..., :8]), ValueError, "same head dim"),
    "gqa": (
        dict(key=jnp.ones((2, 12, 3, 16)), value=jnp.ones((2, 12, 3, 16))),
        ValueError,
        "multiple of key/value heads",
    ),
    "int-dtype": (dict(query=Q.astype(jnp.int32)), TypeError, "query must have a floating dtype"),
    "mixed-dtype": (dict(query=Q.astype(jnp.bfloat16)), TypeError, "share one dtype"),
    "head-dim-300": (
        dict(
            query=jnp.ones((2, 8, 4, 300)),
            key=jnp.ones((2, 12, 2, 300)),
            value=jnp.ones((2, 12, 2, 300)),
        ),
        ValueError,
        "head dim must be in 1..256",
    ),
    "dropout-rate": (dict(dropout_rate=1.0, dropout_rng=RNG), ValueError, "dropout_rate"),
    "dropout-no-key": (dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    "window-negative": (dict(local_window_size=-1), ValueError, "local_window_size"),
    "window-triple": (dict(local_window_size=(1, 2, 3)), ValueError, "local_window_size"),
    "window-float": (dict(local_window_size=(1.5, 2)), ValueError, "local_window_size"),
    "q-lengths-dtype": (
        dict(query_seq_lengths=L.astype(jnp.float32)),
        TypeError,
        "query_seq_lengths",
    ),
    "kv-lengths-shape": (
        dict(key_value_seq_lengths=jnp.array([1, 2, 3])),
        ValueError,
        "key_value_seq_lengths",
    ),
    "segments-shape": (
        dict(q_segment_ids=S[:, :4], kv_segment_ids=KS),
        ValueError,
        "q_segment_ids",
    ),
    "segments-dtype": (
        dict(q_segment_ids=S, kv_segment_ids=KS.astype(jnp.float32)),
        TypeError,
        "kv_segment_ids",
    ),
    "segments-alone": (dict(q_segment_ids=S), ValueError, "given together"),
    "bias-shape": (dict(bias=jnp.ones((3, 1, 8, 12))), ValueError, "bias must be broadcastable"),
    "bias-dtype": (dict(bias=jnp.ones((8, 12), jnp.int32)), TypeError, "bias must have a floating"),
    "mask-shape": (dict(mask=jnp.ones((8, 13), bool)), ValueError, "mask must be broadcastable"),
    "softcap": (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
    "scale": (dict(scale="big"), ValueError, "scale"),
    "scale-inf": (dict(scale=float("inf")), ValueError, "scale must be finite"),
    "head-dim-0": (
        dict(
            query=jnp.ones((2, 8, 4, 0)), key=jnp.ones((2, 12, 2, 0)), value=jnp.ones((2, 12, 2, 0))
        ),
        ValueError,
        "head dim must be in 1..256",
    ),
    "mask-float": (dict(mask=jnp.ones((8, 12))), TypeError, "mask must be a bool array"),
    "q-offsets": (dict(q_offsets=jnp.ones((2,), jnp.float32)), TypeError, "q_offsets"),
    "kv-offsets-shape": (dict(kv_offsets=jnp.ones((3,), jnp.int32)), ValueError, "kv_offsets"),
    "block-mask-type": (dict(block_mask="x"), TypeError, "block_mask must be a flashjax.BlockMask"),
    "implementation": (dict(implementation="cudnn"), ValueError, "implementation must be one of"),
    "deterministic-int": (dict(deterministic=1), TypeError, "deterministic must be a Python bool"),
    "deterministic-str": (dict(deterministic="yes"), TypeError, "deterministic must be a Python"),
    "deterministic-array": (
        dict(deterministic=jnp.array(True)),
        TypeError,
        "deterministic must be a Python bool",
    ),
    "triton-float64": (dict(implementation="triton"), ValueError, "cannot serve this call: dtype"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name: str) -> None:
    overrides, error, message = BAD[name]
    args = dict(query=Q, key=KV, value=KV) | overrides
    with jax.enable_x64(name == "triton-float64"):
        if name == "triton-float64":
            args = {
                n: (x.astype(jnp.float64) if n in ("query", "key", "value") else x)
                for n, x in args.items()
            }
        with pytest.raises(error, match=message):
            dot_product_attention(**args)
