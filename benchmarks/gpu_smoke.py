"""Quick GPU check during kernel development: lowering + correctness of every feature, then a few
timings beside cuDNN and tokamax (same run). Usage on the device: python benchmarks/gpu_smoke.py"""

from __future__ import annotations

import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax import dot_product_attention as dpa

print(jax.devices(), jax.__version__, flush=True)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name, B, T, S, N, K, H, dtype=jnp.bfloat16, **kw):
    key = jax.random.PRNGKey(hash(name) % 2**31)
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), dtype)
    if kw.pop("with_bias", False):
        kw["bias"] = jax.random.normal(ks[4], (1, N, T, S), jnp.float32)

    def run(impl, q, k, v):
        f = jax.jit(lambda q, k, v: jax.vjp(lambda *a: dpa(*a, implementation=impl, **kw), q, k, v))
        out, vjp = f(q, k, v)
        return out, vjp(do.astype(out.dtype))

    try:
        t0 = time.perf_counter()
        out, grads = run("triton", q, k, v)
        jax.block_until_ready(grads)
        ms = (time.perf_counter() - t0) * 1e3
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_grads = run("xla", *f32)
        errs = [rel(out, ref_out)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
        ok = all(e < 2e-2 for e in errs) and all(np.isfinite(errs))
        print(f"{'OK ' if ok else 'BAD'} {name:40s} errs={['%.1e' % e for e in errs]} ({ms:.0f} ms)", flush=True)
        return ok
    except Exception:
        print(f"ERR {name}", flush=True)
        traceback.print_exc()
        return False


cases = [
    ("plain-d64", 2, 256, 256, 4, 4, 64, {}),
    ("odd-T77-S190-d72", 2, 77, 190, 4, 2, 72, {}),
    ("causal-d128", 1, 512, 512, 4, 1, 128, {"is_causal": True}),
    ("window-d64", 1, 500, 500, 2, 2, 64, {"local_window_size": (64, 16)}),
    ("causal-window-gqa", 2, 300, 300, 8, 2, 64, {"is_causal": True, "local_window_size": 100}),
    ("softcap-bias", 1, 200, 250, 4, 4, 64, {"logits_soft_cap": 5.0, "with_bias": True}),
    ("segments-causal", 2, 256, 256, 4, 4, 64, {
        "q_segment_ids": jnp.repeat(jnp.arange(4), 64)[None].repeat(2, 0),
        "kv_segment_ids": jnp.repeat(jnp.arange(4), 64)[None].repeat(2, 0), "is_causal": True}),
    ("lengths-mask", 2, 128, 160, 4, 4, 64, {
        "query_seq_lengths": jnp.array([100, 128], jnp.int32),
        "key_value_seq_lengths": jnp.array([50, 160], jnp.int32),
        "mask": jnp.tril(jnp.ones((128, 160), bool))}),
    ("d256", 1, 256, 256, 2, 2, 256, {}),
    ("d40-T1", 2, 1, 33, 4, 1, 40, {}),
    ("fp16", 1, 256, 256, 4, 4, 64, {"dtype": jnp.float16}),
    ("fp32", 1, 128, 128, 2, 2, 64, {"dtype": jnp.float32}),
    ("dropout", 1, 256, 256, 4, 4, 64, {"dropout_rate": 0.1, "dropout_rng": jax.random.PRNGKey(3)}),
]
results = []
for name, B, T, S, N, K, H, kw in cases:
    kw = dict(kw)
    dtype = kw.pop("dtype", jnp.bfloat16)
    results.append(check(name, B, T, S, N, K, H, dtype=dtype, **kw))
print(f"correctness: {sum(results)} passed, {len(results) - sum(results)} failed", flush=True)

# ---- timing ----
try:
    sys.path.insert(0, "/tmp/tk")
    import tokamax  # noqa: F401

    have_tokamax = True
except Exception as e:  # noqa: BLE001
    print("no tokamax:", e)
    have_tokamax = False


def bench(f, *args, reps=10):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def impls():
    yield "flashjax", lambda q, k, v, c: dpa(q, k, v, is_causal=c, implementation="triton")
    yield "cudnn", lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")
    if have_tokamax:
        import tokamax

        yield "tk_triton", lambda q, k, v, c: tokamax.dot_product_attention(q, k, v, is_causal=c, implementation="triton")


seqs = [int(s) for s in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["1024", "4096", "16384"])]
for H in (64, 128):
    for T in seqs:
        for causal in (False, True):
            B, N = 16384 // T, 2048 // H
            ks = jax.random.split(jax.random.PRNGKey(0), 3)
            q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in ks)
            flops = 4 * B * N * T * T * H / (2 if causal else 1)
            row = []
            for name, f in impls():
                try:
                    tf = bench(lambda q, k, v: f(q, k, v, causal), q, k, v)
                    g = jax.grad(lambda q, k, v: f(q, k, v, causal).astype(jnp.float32).sum(), argnums=(0, 1, 2))
                    tb = bench(g, q, k, v) - tf
                    row.append(f"{name} {flops / tf / 1e12:.0f}/{2.5 * flops / tb / 1e12:.0f}")
                except Exception as e:  # noqa: BLE001
                    row.append(f"{name} ERR {type(e).__name__}: {str(e)[:200]}")
            print(f"H={H} T={T} causal={causal}: " + " | ".join(row), flush=True)
