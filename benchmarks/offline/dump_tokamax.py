"""tokamax's Mosaic GPU forward (the anchor) compiled for the H200 on a machine without a GPU,
its PTX and SASS kept, to set beside ours (`dump.py`) instruction by instruction
(`sass_mix.py`). tokamax checks for a GPU in several places; this runs it as a cross-compile:
its `tokamax_cross_compile` flag, its sm90 kernels picked, no autotuning cache, 132 SMs for the
persistent grid, and a stand-in for `jaxtyping` (annotations only) when the venv has none.
Usage, from the repo root, with the offline venv and tokamax's wheels unpacked into a folder:
  .sm90venv/bin/python -m pip install --no-index --no-deps --target /tmp/tk .tokamax/*.whl
  PYTHONPATH=/tmp/tk:.:benchmarks .sm90venv/bin/python benchmarks/offline/dump_tokamax.py \
      OUT_DIR [--head-dim 64] [--seq 2048] [--causal]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offline as h200  # noqa: E402  (before jax: it sets the environment)

H200_SMS = 132


def _jaxtyping_stand_in() -> None:
    """`jaxtyping` as tokamax uses it (decorators and subscripted annotations), checking nothing."""
    module = types.ModuleType("jaxtyping")

    class _Annotation:
        def __class_getitem__(cls, item):
            return object

    module.jaxtyped = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    module.__getattr__ = lambda name: _Annotation
    sys.modules["jaxtyping"] = module


def _as_cross_compile() -> None:
    """tokamax's sm90 Mosaic path with no GPU present."""
    from absl import flags

    flags.FLAGS(["dump_tokamax"])
    flags.FLAGS.tokamax_cross_compile = True
    from tokamax._src import gpu_utils
    from tokamax._src import mosaic_gpu as tokamax_mgpu
    from tokamax._src.ops import op

    gpu_utils.is_sm80 = gpu_utils.is_sm100 = lambda *_, **__: False
    gpu_utils.is_sm90 = lambda *_, **__: True
    op.BoundArguments.cached_autotuning_data = property(lambda self: None)

    class _NoMetadata:  # (the HLO metadata's JSON fails on a CPU client's shapes)
        def dump_json(self, *_, **__):
            return b"{}"

    op.BOUND_ARGS_ADAPTER = _NoMetadata()
    device = types.SimpleNamespace(core_count=H200_SMS)
    tokamax_mgpu.backend = types.SimpleNamespace(get_default_device=lambda: device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--causal", action="store_true")
    args = p.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(out)
    try:
        import jaxtyping  # noqa: F401
    except ImportError:
        _jaxtyping_stand_in()
    import jax
    import jax.numpy as jnp
    import tokamax

    _as_cross_compile()
    batch, heads = 16384 // args.seq, 2048 // args.head_dim  # the standard bench shape
    x = jax.ShapeDtypeStruct((batch, args.seq, heads, args.head_dim), jnp.bfloat16)

    def forward(q, k, v):
        return tokamax.dot_product_attention(
            q, k, v, is_causal=args.causal, implementation="mosaic_gpu"
        )

    h200.compile_for_h200(forward, x, x, x)
    h200.assemble(out)


if __name__ == "__main__":
    main()
