"""The GPT-2 example (`examples/gpt2`) on CPU: data packing, backends, training, checkpoints.

The `tiny` config at short sequences; flashjax runs its chunked XLA path ("xla_chunked"), and one
test its Pallas kernels in interpret mode. The cuDNN backend needs a GPU: one `gpu`-marked test
(`pytest -m gpu tests/test_gpt2.py`) compares all three backends there; on CPU its arguments (the
dense segment mask) are checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.gpt2 import bench, data, train
from examples.gpt2.attention import NO_ATTENTION, AttentionFn, SegmentMask, attention_arguments
from examples.gpt2.model import GPT, get_config

FLASH = AttentionFn("flashjax", "xla_chunked")
XLA = AttentionFn("xla")


def _docs(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).astype(np.uint16) for n in lengths]


def _doc_index(lengths: list[int]) -> np.ndarray:
    """Per token of the packed stream, the index of its document (BOS included)."""
    return np.concatenate([np.full(n + 1, i) for i, n in enumerate(lengths)])


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    """2 MiB of the standard library's sources (no cache: built in well under a second)."""
    return data.build_corpus(max_bytes=2 * 2**20, val_fraction=0.2)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def test_packing_segment_ids_and_positions() -> None:
    """Every row's segment ids group exactly the tokens of one document, positions count from
    each document's BOS, and targets are the inputs shifted by one."""
    lengths = [5, 40, 1, 17, 63, 2, 30, 9, 50, 3]
    stream = data.pack_documents(_docs(lengths))
    owner = _doc_index(lengths)
    assert len(stream) == sum(lengths) + len(lengths)
    assert np.all(stream[np.flatnonzero(np.diff(owner, prepend=-1))] == data.ByteTokenizer.BOS)
    seq = 16
    sampler = data.BatchSampler(stream, seq, batch_size=4)
    for row in range(sampler.num_rows):
        start = row * seq
        batch = data.make_batch(sampler.rows(np.asarray([row])))
        np.testing.assert_array_equal(batch.inputs[0], stream[start : start + seq])
        np.testing.assert_array_equal(batch.targets[0], stream[start + 1 : start + seq + 1])
        docs, segs = owner[start : start + seq], batch.segment_ids[0]
        same_doc = docs[:, None] == docs[None, :]
        np.testing.assert_array_equal(segs[:, None] == segs[None, :], same_doc)
        first = {d: np.flatnonzero(owner == d)[0] for d in np.unique(docs)}
        expected_pos = [start + i - max(first[d], start) for i, d in enumerate(docs)]
        np.testing.assert_array_equal(batch.positions[0], expected_pos)


def test_sampler_is_a_function_of_the_step() -> None:
    """`batch(step)` is the same from a fresh sampler (what resuming needs), and one epoch visits
    every row once."""
    stream = data.pack_documents(_docs([300, 200, 500]))
    a, b = data.BatchSampler(stream, 8, 4, seed=3), data.BatchSampler(stream, 8, 4, seed=3)
    for step in (0, 7, 3, 40):
        np.testing.assert_array_equal(a.batch(step).inputs, b.batch(step).inputs)
    assert sorted(a._permutation(0).tolist()) == list(range(a.num_rows))
    assert not np.array_equal(a._permutation(0), a._permutation(1))


@pytest.mark.parametrize("docs_per_row", [1, 4, 8])
def test_cut_documents_gives_each_row_n_documents(docs_per_row: int) -> None:
    """With documents cut to `seq // N` tokens every row holds exactly N documents, each opened by
    a BOS with positions 0, 1, ...; the pieces are the documents' own bytes in order, and a
    document's short tail (or a short document) is dropped."""
    lengths = [5, 400, 31, 130, 64, 1000, 7, 95]
    docs, seq = _docs(lengths, seed=5), 128
    doc_len = data.doc_len_for(seq, docs_per_row)
    stream = data.cut_documents(data.pack_documents(docs), doc_len)
    width = doc_len - 1
    expected = [d[i : i + width] for d in docs for i in range(0, len(d) - width + 1, width)]
    pieces = stream.reshape(-1, doc_len)
    assert stream.dtype == np.uint16 and np.all(pieces[:, 0] == data.ByteTokenizer.BOS)
    np.testing.assert_array_equal(pieces[:, 1:], np.stack(expected))
    sampler = data.BatchSampler(stream, seq, batch_size=2)
    batch = data.make_batch(sampler.rows(np.arange(sampler.num_rows)))
    per_row = np.arange(seq) // doc_len
    np.testing.assert_array_equal(
        batch.segment_ids, np.broadcast_to(per_row + 1, (len(batch.inputs), seq))
    )
    np.testing.assert_array_equal(
        batch.positions, np.broadcast_to(np.arange(seq) % doc_len, batch.inputs.shape)
    )
    # seq not a multiple of N: rows hold N or N + 1 documents, segments and positions consistent.
    odd = data.make_batch(data.BatchSampler(stream, seq + 5, 2).rows(np.arange(3)))
    counts = odd.segment_ids.max(axis=-1) - odd.segment_ids.min(axis=-1) + 1
    assert set(counts.tolist()) <= {docs_per_row, docs_per_row + 1}
    restarts = odd.positions[:, 1:] == 0
    np.testing.assert_array_equal(restarts, np.diff(odd.segment_ids, axis=-1) == 1)
    with pytest.raises(ValueError, match="docs_per_row"):
        data.doc_len_for(seq, seq)


def test_corpus_is_offline_text_split_by_path(corpus: data.Corpus) -> None:
    """The standard library's files become documents; the split is a stable function of the path
    and both splits hold real text."""
    assert corpus.meta["train_documents"] > 10 and corpus.meta["val_documents"] > 0
    for stream in (corpus.train, corpus.val):
        assert stream[0] == data.ByteTokenizer.BOS
        assert stream.max() <= data.ByteTokenizer.BOS
    text = data.ByteTokenizer().decode(corpus.train[:20000])
    assert "def " in text or "import " in text
    assert data.is_validation("a/b.py", 0.5) == data.is_validation("a/b.py", 0.5)
    tokenizer = data.ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("héllo ✓")) == "héllo ✓"


def test_attention_arguments_per_backend() -> None:
    """One helper: segment ids for flashjax, the equivalent (B, 1, T, S) boolean mask for jax.nn's
    backends."""
    q = jnp.asarray([[0, 0, 1, 1, 2]], jnp.int32)
    seg = SegmentMask(q, q)
    args = attention_arguments("flashjax", seg)
    assert set(args) == {"q_segment_ids", "kv_segment_ids"}
    expected = np.asarray(q[0][:, None] == q[0][None, :])[None, None]
    for backend in ("xla", "cudnn"):
        mask = attention_arguments(backend, seg)["mask"]
        assert mask.dtype == jnp.bool_ and mask.shape == (1, 1, 5, 5)
        np.testing.assert_array_equal(mask, expected)
    assert attention_arguments("xla", None) == {}
    with pytest.raises(ValueError, match="backend"):
        AttentionFn("torch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _params(config, seed: int = 0) -> nnx.State:
    return nnx.state(GPT(config, FLASH, rngs=nnx.Rngs(seed)), nnx.Param)


def _logits(config, attention: AttentionFn, params: nnx.State, batch: data.Batch) -> np.ndarray:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(config, attention, rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(params: nnx.State, *args: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return model.logits(model(*args))

    args = [jnp.asarray(x) for x in (batch.inputs, batch.segment_ids, batch.positions)]
    return np.asarray(forward(params, *args), np.float64)


def _packed_batch(lengths: list[int], seq: int, rows: int) -> data.Batch:
    stream = data.pack_documents(_docs(lengths, seed=1))
    return data.make_batch(data.BatchSampler(stream, seq, rows).rows(np.arange(rows)))


def test_forward_is_the_same_with_each_backend() -> None:
    """The tiny model's logits (float32 compute) agree between flashjax and jax.nn's XLA path on
    packed rows, and the segment mask is in effect (without it the logits change)."""
    config = get_config("tiny", dtype="float32")
    params = _params(config)
    batch = _packed_batch([20, 70, 3, 45, 120, 11, 60], seq=96, rows=3)
    assert len(np.unique(batch.segment_ids[0])) > 1
    flash, xla = _logits(config, FLASH, params, batch), _logits(config, XLA, params, batch)
    scale = np.max(np.abs(xla))
    np.testing.assert_allclose(flash, xla, rtol=0, atol=2e-5 * scale)
    unpacked = dataclasses.replace(batch, segment_ids=np.zeros_like(batch.segment_ids))
    assert np.max(np.abs(_logits(config, XLA, params, unpacked) - xla)) > 1e-3 * scale


def test_forward_bf16_backends_agree() -> None:
    """In bfloat16 compute the backends agree within bf16 round-off."""
    config = get_config("tiny")
    params = _params(config, seed=1)
    batch = _packed_batch([33, 90, 14, 70], seq=96, rows=2)
    flash, xla = _logits(config, FLASH, params, batch), _logits(config, XLA, params, batch)
    assert np.max(np.abs(flash - xla)) <= 3e-2 * np.max(np.abs(xla))


def test_packed_document_equals_document_alone() -> None:
    """With segment ids and positions restarting at each BOS, a document's logits inside a packed
    row equal its logits run alone: packing changes nothing a document can see."""
    config = get_config("tiny", dtype="float32")
    params = _params(config, seed=2)
    lengths = [30, 25, 40]
    batch = _packed_batch(lengths, seq=sum(lengths) + len(lengths) - 1, rows=1)
    packed = _logits(config, FLASH, params, batch)[0]
    start = lengths[0] + 1
    alone = data.make_batch(batch.inputs[:, start : start + lengths[1] + 2])
    alone_logits = _logits(config, XLA, params, alone)[0]
    n = lengths[1] + 1  # The document's BOS and bytes.
    np.testing.assert_allclose(
        packed[start : start + n], alone_logits[:n], atol=2e-5 * np.max(np.abs(alone_logits))
    )


def test_triton_kernels_in_interpret_mode_match() -> None:
    """flashjax's Pallas kernels (interpret mode on CPU) give the model the same forward as XLA."""
    config = get_config("tiny", dtype="float32", num_layers=1)
    params = _params(config, seed=3)
    batch = _packed_batch([10, 30, 5], seq=32, rows=1)
    triton = _logits(config, AttentionFn("flashjax", "triton"), params, batch)
    xla = _logits(config, XLA, params, batch)
    np.testing.assert_allclose(triton, xla, rtol=0, atol=2e-5 * np.max(np.abs(xla)))


@pytest.mark.gpu
def test_forward_is_the_same_with_each_backend_on_gpu() -> None:
    """On a GPU: flashjax's Triton kernels, its default (Mosaic on Hopper), jax.nn's XLA path and
    cuDNN give the tiny model (bf16) the same logits on packed rows, within bf16 round-off."""
    config = get_config("tiny")
    params = _params(config, seed=4)
    batch = _packed_batch([20, 70, 3, 45, 120, 11, 60, 300, 9], seq=128, rows=4)
    xla = _logits(config, XLA, params, batch)
    for attention in (
        AttentionFn("flashjax", "triton"),
        AttentionFn("flashjax"),
        AttentionFn("cudnn"),
    ):
        other = _logits(config, attention, params, batch)
        assert np.max(np.abs(other - xla)) <= 3e-2 * np.max(np.abs(xla)), attention


def test_param_count_of_gpt2_sizes() -> None:
    """small and medium have GPT-2's 124M / 350M parameters (tied embedding counted once)."""
    assert round(get_config("small").num_params() / 1e6) == 124
    assert round(get_config("medium").num_params() / 1e6) == 355
    tiny = get_config("tiny")
    count = sum(x.size for x in jax.tree.leaves(_params(tiny)))
    assert count == tiny.num_params()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _trainer(steps: int, **overrides) -> train.Trainer:
    config = train.TrainConfig(
        seq_len=64, batch_size=8, steps=steps, lr=3e-3, warmup_steps=2, **overrides
    )
    return train.Trainer(get_config("tiny"), config, FLASH)


def test_training_lowers_the_loss(corpus: data.Corpus) -> None:
    """A few AdamW steps on real text lower the training and the validation loss."""
    trainer = _trainer(16, grad_accum=2)
    sampler = data.BatchSampler(corpus.train, 64, 8)
    val = data.eval_batches(corpus.val, 64, 8, 2)
    state = trainer.init_state()
    before = trainer.evaluate(state, val)
    result = train.train(trainer, sampler, val, state=state, progress=False, log_every=4)
    losses = [x for _, x in result.train_losses]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    assert result.val_losses[-1][1] < before - 0.5
    assert int(result.final_state.step) == 16


def test_grad_accumulation_matches_one_big_batch(corpus: data.Corpus) -> None:
    """Two micro-batches of 4 give the step of one batch of 8 (same loss, same update)."""
    sampler = data.BatchSampler(corpus.train, 64, 8)
    batch = sampler.batch(0)
    out = []
    for accum in (1, 2):
        config = train.TrainConfig(seq_len=64, batch_size=8, grad_accum=accum, steps=4)
        trainer = train.Trainer(get_config("tiny", dtype="float32"), config, FLASH)
        state, metrics = trainer.step(trainer.init_state(), batch)
        out.append((float(metrics["loss"]), state.params))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_no_attention_floor_trains_without_attention(
    corpus: data.Corpus, capsys: pytest.CaptureFixture
) -> None:
    """`AttentionFn("none")`, the bench's timing floor: each position's output is its value
    (whatever the mask), a training step runs and changes the parameters; the bench runs it
    first, for throughput only, and refuses an unknown backend by the option's name."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 4, 8)) for i in range(3))
    seg = SegmentMask(jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))
    floor = AttentionFn(NO_ATTENTION)
    np.testing.assert_array_equal(floor(q, k, v, mask=seg, is_causal=True), v)
    assert floor(q, k, v, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    config = train.TrainConfig(seq_len=64, batch_size=8, steps=2)
    trainer = train.Trainer(get_config("tiny", dtype="float32"), config, floor)
    state = trainer.init_state()
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]  # the step donates it
    new, metrics = trainer.step(state, data.BatchSampler(corpus.train, 64, 8).batch(0))
    assert math.isfinite(float(metrics["loss"]))
    moved = [np.any(a != b) for a, b in zip(before, jax.tree.leaves(new.params))]
    assert any(moved)
    plans = bench._worker_plans(bench.Plan(), ["flashjax", NO_ATTENTION, "cudnn"])
    assert [name for name, _, _ in plans] == [NO_ATTENTION, "cudnn", "flashjax"]
    assert {t["kind"] for t in plans[0][1]} == {"throughput"}
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/unused", "--backends", "flashjax,torch"])
    assert "--backends: a comma list of flashjax, xla, cudnn, none" in capsys.readouterr().err


def test_chunked_loss_equals_plain_loss() -> None:
    """The memory-saving chunked loss (with a ragged last chunk) has the plain loss's value and
    gradient."""
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (2, 24, 16))
    embedding = jax.random.normal(keys[1], (50, 16))
    targets = jax.random.randint(keys[2], (2, 24), 0, 50)

    def loss(h, e, chunk):
        return train.cross_entropy(h, e, targets, "float32", chunk)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    plain, chunked = grad(hidden, embedding, 0), grad(hidden, embedding, 10)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule() -> None:
    """Linear warm-up to the peak, cosine to `min_lr_ratio * lr` at the last step."""
    config = train.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    h = train.schedule_hparams(config)
    lr = [float(train.learning_rate(s, h)) for s in (0, 9, 10, 55, 100, 150)]
    assert lr[0] == pytest.approx(0.1) and lr[1] == pytest.approx(1.0)
    assert lr[2] == pytest.approx(1.0) and lr[3] == pytest.approx(0.55)
    assert lr[4] == pytest.approx(0.1) and lr[5] == pytest.approx(0.1)


def test_checkpoint_resume_continues_the_same_trajectory(
    corpus: data.Corpus, tmp_path: Path
) -> None:
    """6 steps straight == 3 steps, save, restore into a fresh trainer, 3 more steps: the same
    losses and the same final parameters and optimizer state; with the plain `.npz` format and,
    where it is installed, orbax."""
    sampler = data.BatchSampler(corpus.train, 64, 8)
    trainer = _trainer(6)
    straight = train.train(trainer, sampler, progress=False, log_every=1)
    first = train.train(trainer, sampler, stop_at=3, progress=False, log_every=1)
    fresh = _trainer(6)  # Nothing carries over to it but the checkpoint.
    for fmt in ["npz"] + (["orbax"] if train.ocp is not None else []):
        train.save_checkpoint(tmp_path / fmt, first.final_state, {"note": "test"}, fmt=fmt)
        folder = train.latest_checkpoint(tmp_path / fmt)
        assert folder is not None and folder.name == "step_00000003"
        assert json.loads((folder / "meta.json").read_text())["format"] == fmt
        restored = train.restore_checkpoint(folder, jax.eval_shape(fresh.init_state))
        assert int(restored.step) == 3
        second = train.train(fresh, sampler, state=restored, progress=False, log_every=1)

        resumed = first.train_losses + second.train_losses
        assert [s for s, _ in resumed] == [s for s, _ in straight.train_losses]
        np.testing.assert_allclose(
            [x for _, x in resumed], [x for _, x in straight.train_losses], rtol=1e-6
        )
        for a, b in zip(
            jax.tree.leaves(second.final_state), jax.tree.leaves(straight.final_state), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_progress_never_shows_nan_speed(
    corpus: data.Corpus, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the first timed interval (the first one holds the compilation) the progress shows
    `-- tok/s`, not `nan tok/s`; afterwards a number. With tqdm's bar and with plain lines."""
    trainer = _trainer(3)
    sampler = data.BatchSampler(corpus.train, 64, 8)
    for bar in ("tqdm", "lines"):
        if bar == "lines":
            monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` fails.
        train.train(trainer, sampler, log_every=1)
        out = capsys.readouterr().out
        assert not re.search(r"\bnan\b", out, re.IGNORECASE), out
        assert "-- tok/s" in out and re.search(r"\d tok/s", out), out
    assert out.splitlines()[0].startswith("step      1/3 |") and "-- tok/s" in out.splitlines()[0]
    assert train.speed_text(math.nan) == "-- tok/s" and train.speed_text(1234.5) == "1,234 tok/s"


def test_command_line_runs_a_few_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m examples.gpt2.train` on CPU: tiny, a few steps, a checkpoint, a summary line, and
    no `nan` in the output."""
    result = train.main(
        [
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--max-corpus-mb",
            "1",
            "--data-cache",
            str(tmp_path / "data"),
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--eval-batches",
            "1",
            "--log-every",
            "1",
        ]
    )
    assert len(result.train_losses) == 3
    assert train.latest_checkpoint(tmp_path / "ckpt") is not None
    out = capsys.readouterr().out
    assert "done: train loss" in out and not re.search(r"\bnan\b", out, re.IGNORECASE), out


def test_eval_every_default_is_what_help_says(
    corpus: data.Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `--eval-every` the validation loss comes at the interval `--help` states."""
    help_text = " ".join(train._parser().format_help().split())
    found = re.search(r"--eval-every EVAL_EVERY default: every (\d+)% of the run", help_text)
    assert found, help_text
    monkeypatch.setattr(train.data, "load_corpus", lambda *args, **kwargs: corpus)
    args = ["--steps", "10", "--seq-len", "32", "--eval-batches", "1", "--log-every", "5"]
    result = train.main(args)
    every = 10 * int(found[1]) // 100
    assert [step for step, _ in result.val_losses] == list(range(every, 11, every))


def test_command_line_docs_per_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--docs-per-row N` trains on documents cut so that each row holds N of them."""
    args = ["--steps", "2", "--seq-len", "32", "--max-corpus-mb", "1", "--eval-batches", "1"]
    args += ["--data-cache", str(tmp_path / "data"), "--docs-per-row", "4"]
    result = train.main(args)
    assert len(result.train_losses) == 2 and all(math.isfinite(x) for _, x in result.train_losses)
    assert "4 documents of 8 tokens per row" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="docs-per-row"):
        train.main([*args[:-1], "17"])


def test_context_parallel_training_matches_one_device(
    corpus: data.Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--context-parallel 2` (each row's sequence sharded over 2 host devices, ring attention in
    the zigzag layout, packed documents) trains to the single-device losses, float32."""
    monkeypatch.setattr(train.data, "load_corpus", lambda *args, **kwargs: corpus)
    args = ["--steps", "3", "--seq-len", "64", "--batch-size", "4", "--dtype", "float32"]
    args += ["--eval-batches", "1", "--log-every", "1", "--flash-impl", "xla_chunked"]
    one = train.main(args)
    ring = train.main([*args, "--context-parallel", "2"])
    for got, want in ((ring.train_losses, one.train_losses), (ring.val_losses, one.val_losses)):
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) > 0
        np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Benchmark report (the GPU run's parent process, fed with made-up records)
# --------------------------------------------------------------------------------------------------


def test_bench_report_handles_every_outcome(tmp_path: Path) -> None:
    """Analysis, tables and plots of the benchmark work with ok, out-of-memory, error and skipped
    records, and the parity verdict uses twice the bf16-vs-fp32 gap as tolerance. Packed-documents
    rows (`docs_per_row`) go into the table, not into the longest-sequence ladder."""
    plan = bench.Plan()

    def speed(backend: str, config: str, seq: int, status: str = "ok", **kw) -> dict:
        rec = {"backend": backend, "kind": "throughput", "config": config, "seq": seq}
        rec.update(batch=8, segments=True, status=status, **kw)
        if status == "ok":
            rec.update(
                tokens_per_s=1e5 * 1024 / seq,
                model_tflops_per_s=300.0,
                step_ms_median=80.0,
                plan_peak_bytes=seq * 1e7,
            )
        return rec

    losses = list(np.linspace(11, 4, 200))
    records = [
        {"backend": "flashjax", "kind": "hello", "device_kind": "NVIDIA H100 80GB HBM3"},
        speed("flashjax", "small", 1024),
        speed("flashjax", "small", 4096),
        speed("flashjax", "medium", 1024),
        dict(speed("flashjax", "small", 8192), kind="ladder"),
        dict(speed("flashjax", "small", 16384, "oom", error="RESOURCE_EXHAUSTED"), kind="ladder"),
        speed("xla", "small", 1024),
        speed("xla", "small", 4096, "oom", error="Out of memory"),
        dict(speed("xla", "small", 2048), kind="ladder"),
        speed("cudnn", "small", 1024, "error", error="cuDNN is not detected"),
        dict(speed("cudnn", "small", 1024), segments=False),
        dict(speed("flashjax", "small", 4096), docs_per_row=8, docs_per_row_mean=8.0),
        dict(speed("flashjax", "small", 4096, "oom", error="Out of memory"), docs_per_row=16),
        {"backend": "xla", "kind": "parity", "dtype": "bfloat16", "losses": losses},
        {
            "backend": "xla",
            "kind": "parity",
            "dtype": "float32",
            "losses": [x + 0.01 for x in losses],
        },
        {
            "backend": "flashjax",
            "kind": "parity",
            "dtype": "bfloat16",
            "losses": [x + 0.005 for x in losses],
        },
        {
            "backend": "flashjax",
            "kind": "val_run",
            "status": "ok",
            "steps_done": 100,
            "tokens_per_step": 8192,
            "seconds": 60.0,
            "tokens_per_s": 4e5,
            "train_losses": [(s, 11 - s / 20) for s in range(1, 101)],
            "val_losses": [(10, 9.0), (100, 6.0)],
        },
    ]
    analysis = bench.analyze(records, plan)
    assert analysis["ladder"]["flashjax"]["max_seq"] == 8192
    assert analysis["ladder"]["flashjax"]["first_failure"] == {"seq": 16384, "status": "oom"}
    assert analysis["ladder"]["xla"]["max_seq"] == 2048
    parity = analysis["parity"]
    assert parity["max_gap"] == pytest.approx(0.005) and parity["tolerance"] == pytest.approx(0.02)
    assert parity["verdict"] == "agree"
    result = {"meta": {"device_kind": "NVIDIA H100 80GB HBM3", "date": "2026-01-01"}}
    result["analysis"] = analysis
    text = bench.summary_markdown(result, plan)
    assert "| small | 4096 | xla | - | - | - | - | oom |" in text and "**agree**" in text
    assert "| small (8 docs/row) | 4096 | flashjax | 25,000 |" in text
    assert "| small (16 docs/row) | 4096 | flashjax | - | - | - | - | oom |" in text
    assert bench._device_name(analysis["hello"]) == "h100"
    written = bench.make_plots(result, plan, tmp_path, "x")
    assert len(written) == 3 and all((tmp_path / name).stat().st_size > 0 for name in written)


@pytest.mark.slow
def test_bench_packed_documents_quick(tmp_path: Path) -> None:
    """`bench --quick --only packed` on CPU: each backend measures the tiny model with rows of N
    documents for each N of the quick plan, as throughput records with `docs_per_row`, listed in
    the summary table; the default run has no packed task."""
    default = bench._worker_plans(bench.Plan(), ["xla", "cudnn", "flashjax"])
    assert all(t["kind"] != "packed" for _, tasks, _ in default for t in tasks)
    args = ["--out", str(tmp_path), "--quick", "--only", "packed", "--backends", "flashjax,xla"]
    result = bench.main([*args, "--data-cache", str(tmp_path / "data"), "--budget-s", "120"])
    assert result is not None
    rows = [r for r in result["records"] if r["kind"] == "throughput"]
    assert {(r["backend"], r["docs_per_row"]) for r in rows} == {
        (b, n) for b in ("flashjax", "xla") for n in bench.QUICK.packed_docs
    }
    for r in rows:
        assert r["status"] == "ok" and r["seq"] == bench.QUICK.packed_seq, r
        assert r["config"] == "tiny" and r["tokens_per_s"] > 0 and "plan_peak_bytes" in r
        assert r["docs_per_row_min"] == r["docs_per_row_max"] == r["docs_per_row"]
    summary = next(tmp_path.glob("*-summary.md")).read_text()
    for n in bench.QUICK.packed_docs:
        assert f"| tiny ({n} docs/row) | {bench.QUICK.packed_seq} | flashjax |" in summary
    assert result["analysis"]["ladder"]["flashjax"]["max_seq"] is None


def test_bench_throughput_option_parses_and_rejects() -> None:
    """`--throughput small:1024,medium:1024` sets the throughput task's (config, seq) pairs; a bad
    item exits naming the option."""
    assert bench._config_seqs("small:1024, medium:512") == (("small", 1024), ("medium", 512))
    for bad in ("huge:1024", "small", "small:1k"):
        with pytest.raises(SystemExit, match="--throughput"):
            bench._config_seqs(bad)
