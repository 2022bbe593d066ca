"""GPT-2 generation with a KV cache (`examples/gpt2/generate.py`) on CPU, tiny model.

The cache must change nothing: the logits of a prefill and then one decode step per token equal
the full forward pass over the whole sequence at every position, and greedy generation equals
recomputing the full forward pass at every step, for every attention backend (flashjax's
decode kernel interpreted, flashjax's default CPU path, XLA).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.gpt2 import generate, train
from examples.gpt2.attention import AttentionFn, CacheAttention
from examples.gpt2.model import get_config

CONFIG = get_config("tiny", dtype="float32", max_seq_len=64, num_heads=2)
ATTENTIONS = [
    pytest.param(CacheAttention("flashjax", "triton_decode"), id="flashjax-triton_decode"),
    pytest.param(CacheAttention("flashjax"), id="flashjax-default"),
    pytest.param(CacheAttention("xla"), id="xla"),
]


@pytest.fixture(scope="module")
def params():
    return generate.random_params(CONFIG, seed=0)


def _full_logits(params, tokens: jax.Array) -> jax.Array:
    """`(B, L, V)` float32 logits of the full forward pass (XLA attention)."""
    model = generate.Generator(CONFIG, CacheAttention("xla"), generate.Sampling()).model(params)
    return model.logits(model(tokens))


@pytest.mark.parametrize(
    "attention, batch",
    [pytest.param(*a.values, 2, id=a.id) for a in ATTENTIONS]
    + [pytest.param(CacheAttention("xla"), 1, id="xla-batch1")],
)
def test_cached_steps_equal_the_full_forward(params, attention: CacheAttention, batch) -> None:
    """Teacher forcing: prefill 5 tokens, then step through the other 7 one at a time; each
    step's logits equal the full forward's at that position (at batch 1 too, where a step's
    projections run on a zero-padded second row: `generate._as_matrix`)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (batch, 12)), jnp.int32)
    prompt_len = 5
    gen = generate.Generator(CONFIG, attention, generate.Sampling())

    @jax.jit
    def cached(params, tokens):
        model = gen.model(params)
        layers = generate._layers(model)
        cache = generate.KVCache.zeros(CONFIG, tokens.shape[0], tokens.shape[1])
        logits, cache = gen.prefill(model, layers, tokens[:, :prompt_len], cache)
        out = [logits]
        for pos in range(prompt_len, tokens.shape[1]):
            logits, cache = gen.step(model, layers, tokens[:, pos], jnp.int32(pos), cache)
            out.append(logits)
        return jnp.stack(out, axis=1)

    want = _full_logits(params, tokens)[:, prompt_len - 1 :]
    np.testing.assert_allclose(cached(params, tokens), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("attention", ATTENTIONS[:2])
def test_greedy_generation_equals_recomputing_every_step(params, attention) -> None:
    """`Generator.generate` (one jitted loop, donated cache) against the full forward pass
    recomputed on the growing sequence at every step, argmax each time."""
    gen = generate.Generator(CONFIG, attention, generate.Sampling())
    prompt = jnp.asarray(generate.prompt_tokens("def f(x):", None, 2))
    new_tokens = 8
    cache = generate.KVCache.zeros(CONFIG, 2, prompt.shape[1] + new_tokens)
    got, cache2 = gen.generate(params, cache, prompt, jax.random.key(0), new_tokens)
    assert cache.keys[0].is_deleted()  # donated: updated in place
    seq = prompt
    for _ in range(new_tokens):
        logits = _full_logits(params, seq)[:, -1, : generate.Sampling().vocab]
        seq = jnp.concatenate([seq, jnp.argmax(logits, -1)[:, None].astype(jnp.int32)], axis=1)
    np.testing.assert_array_equal(got, seq[:, prompt.shape[1] :])
    again, _ = gen.generate(params, cache2, prompt, jax.random.key(0), new_tokens)
    np.testing.assert_array_equal(again, got)  # the returned cache serves the next generation


def test_sampling_rules() -> None:
    """top_k=1 is greedy; temperature draws stay in the top k and only among tokenizer ids;
    the same key draws the same tokens."""
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((4, 300)), jnp.float32)
    logits = logits.at[:, 299].set(100.0)  # past the tokenizer's 257 ids: never drawn
    key = jax.random.key(3)
    greedy = generate.sample(logits, key, generate.Sampling())
    np.testing.assert_array_equal(greedy, jnp.argmax(logits[:, :257], -1))
    top1 = generate.sample(logits, key, generate.Sampling(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    hot = generate.Sampling(temperature=2.0, top_k=5)
    draws = np.stack([generate.sample(logits, jax.random.key(i), hot) for i in range(20)])
    top5 = np.argsort(-np.asarray(logits[:, :257]), axis=-1)[:, :5]
    assert all(d in top5[row] for row in range(4) for d in draws[:, row])
    assert len(np.unique(draws)) > 4
    np.testing.assert_array_equal(
        generate.sample(logits, key, hot), generate.sample(logits, key, hot)
    )


def test_no_attention_floor_runs_everything_but_attention(params) -> None:
    """`--attention none` (the timing floor): the same loop and cache writes, no attention; an
    unknown backend is refused."""
    gen = generate.Generator(CONFIG, CacheAttention("none"), generate.Sampling())
    prompt = jnp.zeros((2, 5), jnp.int32)
    cache = generate.KVCache.zeros(CONFIG, 2, 9)
    tokens, cache = gen.generate(params, cache, prompt, jax.random.key(0), 4)
    assert tokens.shape == (2, 4)
    written = np.asarray(cache.keys[0][:, :8])  # the prompt's 5 keys and 3 steps' (the last
    assert np.all(np.any(written != 0, axis=(2, 3)))  # sampled token is not fed back)
    assert not np.any(np.asarray(cache.keys[0][:, 8:]))
    with pytest.raises(ValueError, match="backend must be one of"):
        CacheAttention("flash")


def test_lengths_are_checked(params) -> None:
    gen = generate.Generator(CONFIG, CacheAttention("xla"), generate.Sampling())
    prompt = jnp.zeros((1, 60), jnp.int32)
    with pytest.raises(ValueError, match="more than the model's position embedding holds"):
        gen.generate(params, generate.KVCache.zeros(CONFIG, 1, 70), prompt, jax.random.key(0), 10)
    with pytest.raises(ValueError, match="the cache holds 40 positions"):
        gen.generate(params, generate.KVCache.zeros(CONFIG, 1, 40), prompt[:, :30], None, 20)


def test_command_line_samples_from_a_training_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`examples.gpt2.train` writes a checkpoint; `examples.gpt2.generate` loads it, samples with
    temperature and top-k, prints the text and tokens/s, and writes the record."""
    train.main(
        ["--steps", "2", "--seq-len", "32", "--max-corpus-mb", "1", "--eval-batches", "1"]
        + ["--data-cache", str(tmp_path / "data"), "--ckpt-dir", str(tmp_path / "ckpt")]
        + ["--dtype", "float32"]
    )
    records = generate.main(
        ["--ckpt-dir", str(tmp_path / "ckpt"), "--prompt", "import ", "--new-tokens", "6"]
        + ["--batch-size", "2", "--temperature", "0.9", "--top-k", "20", "--repeats", "1"]
        + ["--attention", "flashjax,xla", "--json", str(tmp_path / "gen.json")]
    )
    out = capsys.readouterr().out
    assert re.search(r"tiny \| attention flashjax \| .* [\d,]+ tokens/s", out), out
    assert "'import ' ->" in out and re.search(r"\| 2 \| xla \| [\d,]+ \| 1.00x \|", out), out
    saved = json.loads((tmp_path / "gen.json").read_text())
    assert [r["tokens_per_s"] for r in saved] == [r["tokens_per_s"] for r in records]
    assert [r["attention"] for r in records] == ["flashjax", "xla"]
    assert records[0]["prompt_len"] == 8 and records[0]["new_tokens"] == 6


def test_same_parameters_as_training() -> None:
    """The generator merges the training model's parameter tree (one checkpoint for both)."""
    trainer_graph = train.Trainer(CONFIG, train.TrainConfig(), AttentionFn("xla")).graphdef
    gen = generate.Generator(CONFIG, CacheAttention("xla"), generate.Sampling())
    assert gen.graphdef == trainer_graph
