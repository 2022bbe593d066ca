"""One Mosaic kernel config compiled for the H200 on a machine without a GPU, its dumps kept:
PTX, ptxas' report, the Mosaic MLIR before/after layout inference and, with an nvdisasm (the
`nvidia-cuda-nvdisasm` wheel of setup.sh), the SASS (`*.sass`, spills marked `SpillRefill`).
Usage, from the repo root, with the offline venv:
  PYTHONPATH=.:benchmarks .sm90venv/bin/python benchmarks/offline/dump.py OUT_DIR fwd|bwd \
      [--head-dim 128] [--seq 1024] [--causal] [--group 1] [--options a+b] [--set name=value ...]
Without `--options`, configs.py's choice for the call (its rules at `--seq` rows, `--causal`
and `--group` query heads per KV head, as the public op picks it); `--options`: the head dim's
row with exactly these on/off options (forward.OPTIONS / backward.OPTIONS) instead; `--set`: any
other field (e.g. `registers=240,24`, `named_free=1`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offline as h200  # noqa: E402  (before jax: it sets the environment)


def _value(text: str):
    """`1` -> 1, `240,24` -> (240, 24), `True` -> True."""
    return ast.literal_eval(text if "," not in text or "(" in text else f"({text})")


def config(
    kernel: str,
    head_dim: int,
    options: str | None,
    sets: list[str],
    seq=None,
    causal=False,
    group=1,
):
    """The config to compile: configs.py's for a call of `seq` rows (`causal`), or with
    `options` the head dim's row with exactly those; `sets` ("field=value") on top."""
    from pallas_kernels.mosaic import api, backward, forward

    module, chosen = (
        (forward, api.forward_config) if kernel == "fwd" else (backward, api.backward_config)
    )
    cfg = chosen(head_dim, seq, causal, group) if options is None else chosen(head_dim)
    if options is not None:
        cfg = module.with_options(cfg, [o for o in options.split("+") if o])
    fields = dict(s.split("=", 1) for s in sets)
    return dataclasses.replace(cfg, **{k: _value(v) for k, v in fields.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("kernel", choices=("fwd", "bwd"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--group", type=int, default=1)
    p.add_argument("--options")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)  # Mosaic prints the dumps instead when it is missing
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(out)

    import jax
    from tune import operands

    from pallas_kernels.mosaic import api

    cfg = config(
        args.kernel, args.head_dim, args.options, args.set, args.seq, args.causal, args.group
    )
    print(cfg, flush=True)
    ops, do = operands(args.seq, args.head_dim, args.causal, args.group)
    if args.kernel == "fwd":
        h200.compile_for_h200(lambda o: api.forward(o, interpret=False, config=cfg), ops)
    else:
        out_, lse2 = jax.eval_shape(lambda o: api.forward(o, interpret=False), ops)

        def grads(o, y, lse, dy):
            return api.backward(o, y, lse, dy, None, False, cfg)

        h200.compile_for_h200(grads, ops, out_, lse2, do)
    h200.assemble(out)


if __name__ == "__main__":
    main()
