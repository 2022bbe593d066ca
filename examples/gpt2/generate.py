"""Sample text from a GPT-2 checkpoint with a KV cache: `python -m examples.gpt2.generate`.

    python -m examples.gpt2.train --ckpt-dir ckpt                     # write a checkpoint
    python -m examples.gpt2.generate --ckpt-dir ckpt --prompt "def " --new-tokens 200
    python -m examples.gpt2.generate --ckpt-dir ckpt --temperature 0.8 --top-k 40
    python -m examples.gpt2.generate --random-init --config small --max-seq-len 2048 \\
        --prompt-len 1024 --new-tokens 1024 --batch-size 32 --attention xla   # speed only

One generation is one jitted call: the prompt's forward pass fills the cache (prefill), then one
`lax.fori_loop` runs a decode step per new token: embed the last token, and in every layer write
its key and value into the cache at its position (`lax.dynamic_update_slice`, in place: the
cache is a loop carry, and the call's cache argument is donated) and attend over the cache
(`--attention flashjax`: `flashjax.decode_attention`, the split-KV kernel on a GPU; `xla` /
`cudnn`: `jax.nn.dot_product_attention` with `key_value_seq_lengths`; `none`: no attention, the
time of everything else, for the most any attention could gain).

The pieces: `KVCache` (one buffer per layer and kind, so that a kernel reads a layer's cache in
place, with no slice of a stacked array copied first), `Sampling` and `sample` (greedy,
temperature, top-k), `Generator` (prefill, step, the jitted generation), `load_params` (a
checkpoint of `examples.gpt2.train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from examples.gpt2 import data, train
from examples.gpt2.attention import (
    NO_ATTENTION,
    TIMED_BACKENDS,
    AttentionFn,
    CacheAttention,
    parse_backends,
)
from examples.gpt2.model import CONFIGS, GPT, Block, GPTConfig, get_config

# --------------------------------------------------------------------------------------------------
# Cache and sampling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, one `Float[Array, "B S N H"]` buffer each (compute
    dtype); positions 0.. of each row hold the tokens seen so far."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: GPTConfig, batch: int, length: int) -> KVCache:
        shape = (batch, length, config.num_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        layers = range(config.num_layers)
        return cls(
            tuple(jnp.zeros(shape, dtype) for _ in layers),
            tuple(jnp.zeros(shape, dtype) for _ in layers),
        )

    @property
    def length(self) -> int:
        """Positions the cache can hold."""
        return self.keys[0].shape[1]


jax.tree_util.register_dataclass(KVCache, data_fields=["keys", "values"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    Attributes:
      temperature: 0 for greedy (argmax); else logits / temperature.
      top_k: draw among the k most likely tokens only (0: all of them).
      vocab: token ids >= vocab are never drawn (the tokenizer's ids; the embedding may have
        padding rows).
    """

    temperature: float = 0.0
    top_k: int = 0
    vocab: int = data.ByteTokenizer.vocab_size

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {self}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """`Int[Array, "B"]` next tokens from `Float[Array, "B V"]` logits."""
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where(ids < sampling.vocab, logits.astype(jnp.float32), -jnp.inf)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


def inference_params(params: nnx.State, dtype: Any) -> nnx.State:
    """Matrices and embeddings cast to the compute dtype once (the layers cast them to it at
    every use anyway: the same numbers, without re-reading float32 weights at every step);
    biases and LayerNorm parameters stay float32."""
    dtype = jnp.dtype(dtype)

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, params)


def _layers(model: GPT) -> list[Block]:
    """The stacked blocks as one module per layer (slices of the parameters, made once)."""
    graphdef, state = nnx.split(model.blocks)
    return [
        nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
        for i in range(model.config.num_layers)
    ]


def _as_matrix(fn: Any, x: jax.Array) -> Any:
    """`fn(x)` for `Float[Array, "B T ..."]` x; a single row (batch 1, one token) goes through
    `fn` with a zero row beside it, dropped from the result: XLA's GPU compiler turns a
    vector x matrix product of fewer than 10M elements into a multiply and a reduce (GPT-2
    small's layer weights: 3-6x slower than reading them in a GEMM on the H200,
    benchmarks/results/2026-12-01-h200-s13/generate), and a second row keeps it a GEMM."""
    if x.shape[0] * x.shape[1] != 1:
        return fn(x)
    out = fn(jnp.concatenate([x, jnp.zeros_like(x)], axis=0))
    return jax.tree.map(lambda y: y[:1], out)


def _attend_layer(
    block: Block,
    x: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    start: jax.Array,
    attend: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block over tokens at positions start.. (`Float[Array, "B T D"]` float32 residual
    stream): their keys and values written into the layer's cache, then
    `attend(q, k, v, k_cache, v_cache)` (q, k, v `(B, T, N, H)`), the output projection and
    the MLP."""
    attn = block.attn
    q, k, v = _as_matrix(lambda x: (attn.query(x), attn.key(x), attn.value(x)), block.ln1(x))
    at = (0, start, 0, 0)
    k_cache = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
    v_cache = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
    y = attend(q, k, v, k_cache, v_cache)
    y = _as_matrix(lambda y: attn.out(y).astype(jnp.float32), y)
    return _as_matrix(block.mlp, x + y), k_cache, v_cache


class Generator:
    """Generation for one model shape and attention backend: `prefill`, `step` and the jitted
    `generate` (compiled per batch, prompt length and number of new tokens)."""

    def __init__(self, config: GPTConfig, attention: CacheAttention, sampling: Sampling) -> None:
        self.config, self.attention, self.sampling = config, attention, sampling
        model_attention = "xla" if attention.backend == NO_ATTENTION else attention.backend
        abstract = nnx.eval_shape(  # (generation runs `attention`, not the model's attention)
            lambda: GPT(config, AttentionFn(model_attention), rngs=nnx.Rngs(0))
        )
        self.graphdef, _ = nnx.split(abstract, nnx.Param)
        self.compiled = jax.jit(self._generate, static_argnums=4, donate_argnums=1)

    def model(self, params: nnx.State) -> GPT:
        return nnx.merge(self.graphdef, params)

    def _run_layers(
        self, layers: list[Block], x: jax.Array, cache: KVCache, start: jax.Array, attend: Any
    ) -> tuple[jax.Array, KVCache]:
        keys, values = [], []
        for block, kc, vc in zip(layers, cache.keys, cache.values):
            x, kc, vc = _attend_layer(block, x, kc, vc, start, attend)
            keys.append(kc)
            values.append(vc)
        return x, KVCache(tuple(keys), tuple(values))

    def _last_logits(self, model: GPT, x: jax.Array) -> jax.Array:
        return model.logits(model.ln_f(x[:, -1]))

    def prefill(
        self, model: GPT, layers: list[Block], tokens: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """The prompt `Int[Array, "B P"]` through the model, its keys and values written at
        positions 0..P-1: the last position's float32 logits `(B, V)` and the cache."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = model.embed(tokens, positions)

        def attend(q, k, v, k_cache, v_cache):
            return self.attention.prefill(q, k, v)

        x, cache = self._run_layers(layers, x, cache, jnp.int32(0), attend)
        return self._last_logits(model, x), cache

    def step(
        self,
        model: GPT,
        layers: list[Block],
        token: jax.Array,
        position: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """One token per row (`Int[Array, "B"]`) at `position`: its keys and values written
        there, attention over the cache's positions 0..position; logits `(B, V)` and the
        cache."""
        batch = token.shape[0]
        x = model.embed(token[:, None], jnp.full((batch, 1), position))
        lengths = jnp.full((batch,), position + 1, jnp.int32)

        def attend(q, k, v, k_cache, v_cache):
            return self.attention.step(q, k_cache, v_cache, lengths)

        x, cache = self._run_layers(layers, x, cache, position, attend)
        return self._last_logits(model, x), cache

    def _generate(
        self,
        params: nnx.State,
        cache: KVCache,
        prompt: jax.Array,
        key: jax.Array,
        new_tokens: int,
    ) -> tuple[jax.Array, KVCache]:
        model = self.model(inference_params(params, self.config.dtype))
        layers = _layers(model)
        batch, prompt_len = prompt.shape
        logits, cache = self.prefill(model, layers, prompt, cache)
        key, first = jax.random.split(key)
        token = sample(logits, first, self.sampling)
        tokens = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(token)

        def body(i, carry):
            tokens, token, cache, key = carry
            logits, cache = self.step(model, layers, token, prompt_len + i, cache)
            key, sub = jax.random.split(key)
            token = sample(logits, sub, self.sampling)
            return tokens.at[:, i + 1].set(token), token, cache, key

        tokens, _, cache, _ = lax.fori_loop(0, new_tokens - 1, body, (tokens, token, cache, key))
        return tokens, cache

    def generate(
        self, params: nnx.State, cache: KVCache, prompt: jax.Array, key: jax.Array, new_tokens: int
    ) -> tuple[jax.Array, KVCache]:
        """`new_tokens` tokens after `Int[Array, "B P"]` prompts: `(B, new_tokens)` int32 and the
        cache (the argument is donated: use the returned one for the next generation). The
        cache must hold P + new_tokens positions, within the model's position embedding."""
        check_lengths(self.config, prompt.shape[1], new_tokens, cache.length)
        return self.compiled(params, cache, prompt, key, new_tokens)


def check_lengths(config: GPTConfig, prompt_len: int, new_tokens: int, cache_len: int) -> None:
    total = prompt_len + new_tokens
    if prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"need a prompt and new tokens, got {prompt_len} and {new_tokens}")
    if total > config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + new tokens ({new_tokens}) = {total} positions, more than the "
            f"model's position embedding holds ({config.max_seq_len}; see --max-seq-len)"
        )
    if total > cache_len:
        raise ValueError(f"the cache holds {cache_len} positions, the generation needs {total}")


# --------------------------------------------------------------------------------------------------
# Checkpoints and the command line
# --------------------------------------------------------------------------------------------------


def load_params(ckpt: str | Path) -> tuple[GPTConfig, nnx.State, Path]:
    """The model config and float32 parameters of a checkpoint of `examples.gpt2.train`: a
    `step_*` folder, or the folder holding them (the latest complete one is taken)."""
    ckpt = Path(ckpt)
    folder = ckpt if (ckpt / "meta.json").exists() else train.latest_checkpoint(ckpt)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt}")
    meta = json.loads((folder / "meta.json").read_text())
    model_config = GPTConfig(**meta["model"])
    trainer = train.Trainer(model_config, train.TrainConfig(**meta["train"]), AttentionFn("xla"))
    state = train.restore_checkpoint(folder, jax.eval_shape(trainer.init_state))
    return model_config, state.params, folder


def random_params(config: GPTConfig, seed: int) -> nnx.State:
    """Freshly initialized parameters (speed measurements without a checkpoint)."""
    return nnx.state(GPT(config, rngs=nnx.Rngs(seed)), nnx.Param)


def prompt_tokens(text: str, length: int | None, batch: int) -> np.ndarray:
    """`(batch, P)` int32: BOS and the text's bytes, repeated to `length` tokens if given."""
    tokens = np.concatenate([[data.ByteTokenizer.BOS], data.ByteTokenizer().encode(text)])
    if length is not None:
        tokens = np.resize(tokens, length)
    return np.tile(tokens.astype(np.int32), (batch, 1))


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of ints: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma list of ints >= 1: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.gpt2.generate",
        description="Sample from a GPT-2 checkpoint with a KV cache (one jitted loop per "
        "generation) and print tokens/s.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt-dir", type=Path, help="a checkpoint of examples.gpt2.train")
    src.add_argument("--random-init", action="store_true", help="no checkpoint (speed only)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small", help="--random-init")
    p.add_argument("--max-seq-len", type=int, help="--random-init: position embedding rows")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="compute dtype override")
    p.add_argument(
        "--attention",
        type=parse_backends,
        default=("flashjax",),
        help=f"comma list of {', '.join(TIMED_BACKENDS)} (default flashjax); several: a "
        f"comparison; {NO_ATTENTION!r}: no attention at all, the time of everything else (its "
        "speed over xla is the most any attention could reach; its text is noise)",
    )
    p.add_argument(
        "--flash-impl",
        choices=("triton_decode", "triton", "xla_chunked", "xla"),
        help="flashjax's decode-step implementation (default: the fastest for the device)",
    )
    p.add_argument("--prompt", default="def ", help="prompt text (after a BOS)")
    p.add_argument("--prompt-len", type=int, help="repeat the prompt to this many tokens")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument(
        "--batch-size", type=_ints, default=(1,), help="rows (the same prompt); a comma list"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed generations (after one warm-up)")
    p.add_argument("--show", type=int, default=1, help="rows of text to print")
    p.add_argument("--json", type=Path, help="write the measurements here")
    return p


def _timed(gen: Generator, params, cache, prompt, key, new_tokens, repeats: int):
    """Generate once to warm up (the compile is timed apart), then `repeats` timed runs."""
    start = time.perf_counter()
    tokens, cache = gen.generate(params, cache, prompt, key, new_tokens)
    tokens.block_until_ready()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, cache = gen.generate(params, cache, prompt, key, new_tokens)
        tokens.block_until_ready()
        seconds.append(time.perf_counter() - start)
    return tokens, first, seconds


def _load(args: argparse.Namespace) -> tuple[GPTConfig, nnx.State, str]:
    """The model config, parameters and where they came from, per the command line."""
    if args.random_init:
        config = get_config(args.config, max_seq_len=args.max_seq_len, dtype=args.dtype)
        return config, random_params(config, args.seed), f"random {args.config}"
    config, params, folder = load_params(args.ckpt_dir)
    if args.dtype:
        config = dataclasses.replace(config, dtype=args.dtype)
    return config, params, str(folder)


def run_one(
    args: argparse.Namespace, config: GPTConfig, params: nnx.State, backend: str, batch: int
) -> dict[str, Any]:
    """Generate with one attention backend at one batch size; print the text and the speed."""
    flash_impl = args.flash_impl if backend == "flashjax" else None
    gen = Generator(
        config, CacheAttention(backend, flash_impl), Sampling(args.temperature, args.top_k)
    )
    prompt = jnp.asarray(prompt_tokens(args.prompt, args.prompt_len, batch))
    total = prompt.shape[1] + args.new_tokens
    check_lengths(config, prompt.shape[1], args.new_tokens, total)
    cache = KVCache.zeros(config, batch, total)
    key = jax.random.key(args.seed)
    tokens, first, seconds = _timed(gen, params, cache, prompt, key, args.new_tokens, args.repeats)
    best = min(seconds) if seconds else first
    tokenizer = data.ByteTokenizer()
    for row in np.asarray(tokens)[: args.show]:
        print(repr(args.prompt[:60]) + " ->", repr(tokenizer.decode(row)))
    new = batch * args.new_tokens
    record = {
        "model": config.name,
        "attention": backend,
        "flash_impl": flash_impl,
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "prompt_len": int(prompt.shape[1]),
        "new_tokens": args.new_tokens,
        "first_call_s": first,
        "seconds": seconds,
        "tokens_per_s": new / best,
        "median_tokens_per_s": new / statistics.median(seconds) if seconds else None,
    }
    print(
        f"{config.name} | attention {backend} | {record['device']} | batch {batch} | prompt "
        f"{prompt.shape[1]} + {args.new_tokens} new tokens: {record['tokens_per_s']:,.0f} "
        f"tokens/s (best of {len(seconds)}; {best:.3f} s per generation; first call with "
        f"compilation {first:.1f} s)",
        flush=True,
    )
    return record


def comparison(records: Sequence[dict[str, Any]]) -> str:
    """tokens/s per (batch, backend), and each over xla's at the same batch."""
    xla = {r["batch"]: r["tokens_per_s"] for r in records if r["attention"] == "xla"}
    lines = ["| batch | attention | tokens/s | vs xla |", "|---:|---|---:|---:|"]
    for r in records:
        ratio = f"{r['tokens_per_s'] / xla[r['batch']]:.2f}x" if r["batch"] in xla else "-"
        lines.append(f"| {r['batch']} | {r['attention']} | {r['tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the command line, generate with each backend and batch size, print the text and
    the speed (and a comparison when there are several); returns the records."""
    args = _parser().parse_args(argv)
    config, params, source = _load(args)
    records = [
        run_one(args, config, params, backend, batch) | {"checkpoint": source}
        for batch in args.batch_size
        for backend in args.attention
    ]
    if len(records) > 1:
        print(comparison(records), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
