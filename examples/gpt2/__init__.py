"""GPT-2 in Flax NNX + optax, with attention from flashjax, jax.nn's XLA path or cuDNN.

    python -m examples.gpt2.train                   # tiny on CPU, small on a GPU
    python -m examples.gpt2.bench --out results/    # the GPU measurements (speed, memory, loss)

Modules: `data` (offline corpus, byte tokenizer, packing with segment ids), `attention` (the
`attention_fn` per backend), `model` (the GPT-2), `train` (optimizer, jitted step, checkpoints,
loop), `bench` (the measurements).
"""
