"""What the compiler made of the decode kernel's loads (GPU only): compiles one 1 x 8k decode step
(32 query / 8 KV heads, head dim 128, bf16) for a contiguous cache and for pages of 16 and 64
keys, with and without `DecodeConfig.prefetch_pages`, with XLA's dumps on, and counts in each
`flashjax_decode` kernel's PTX the asynchronous copies (`cp.async`: the software pipeline's
prefetches into shared memory), the plain global loads by width, and the waits.
Usage on the GPU: python benchmarks/decode_ptx.py DUMP_DIR (the PTX files stay there).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

DUMP = Path(sys.argv[1]).resolve()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"

import jax  # noqa: E402

from flashjax.backends import decode as decode_backend  # noqa: E402
from flashjax.bench.decode import DecodeBench, Shape, make_inputs  # noqa: E402
from flashjax.decode import decode_operands  # noqa: E402
from pallas_kernels import configs  # noqa: E402

PATTERNS = {
    "cp.async 16B": r"cp\.async\.c[ga]\.shared\.global[^;]*, 16;",
    "cp.async other": r"cp\.async\.c[ga]\.shared\.global(?![^;]*, 16;)",
    "cp.async.wait_group": r"cp\.async\.wait_group",
    "ld.global.v4": r"ld\.global(\.\w+)*\.v4",
    "ld.global.v2": r"ld\.global(\.\w+)*\.v2",
    "ld.global scalar": r"ld\.global(?!(\.\w+)*\.v[24])",
    "bar.sync": r"bar\.sync",
}


def kernels_of(ptx: str) -> dict[str, str]:
    """`.entry` name -> body, for the decode kernels of one PTX file."""
    found = {}
    for m in re.finditer(r"\.entry\s+(\w+)\(", ptx):
        if "decode" in m.group(1):
            end = ptx.find("\n}", m.end())
            found[m.group(1)] = ptx[m.start() : end]
    return found


def main() -> None:
    x = make_inputs(Shape(1, 8192), DecodeBench(page_sizes=(16, 64)))
    base = configs.get_decode_config(128, configs.gpu_target())
    for page in (0, 16, 64):
        for prefetch in (False, True) if page else (False,):
            config = dataclasses.replace(base, prefetch_pages=prefetch)
            k, v, table = (x.k, x.v, None) if page == 0 else x.pools[page]

            def step(q, k, v, table, config=config):
                ops = decode_operands(q, k, v, x.lengths, page_table=table)
                return decode_backend.forward(ops, None, config)[0]

            step.__name__ = f"decode_page{page}_prefetch{int(prefetch)}"
            jax.jit(step).lower(x.q, k, v, table).compile()
    print(f"{'module / kernel':70s} " + " ".join(f"{n:>18s}" for n in PATTERNS))
    for path in sorted(DUMP.glob("*.ptx")):
        for name, body in kernels_of(path.read_text()).items():
            counts = [len(re.findall(p, body)) for p in PATTERNS.values()]
            label = f"{path.name[:40]} {name[:28]}"
            print(f"{label:70s} " + " ".join(f"{c:18d}" for c in counts))


if __name__ == "__main__":
    main()
