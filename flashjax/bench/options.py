"""What the bench's command lines share (`python -m flashjax bench` and its `--ring` mode): the
parsers of option values, the default results folder and the first line of a run's output."""

from __future__ import annotations

import argparse
import datetime
import re
import tempfile
from pathlib import Path
from typing import Any


def parse_ints(text: str, minimum: int = 1) -> tuple[int, ...]:
    """Comma list of ints: "512,1k,16k" -> (512, 1024, 16384) ("k" is 1024), each >= `minimum`."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part.rstrip("k")) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {part!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}: {part!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(values)


def parse_modes(text: str) -> tuple[str, ...]:
    """ "fwd,bwd" -> ("fwd", "bwd"); "all" -> every mode; kept in canonical order."""
    from flashjax.bench.flops import MODES

    wanted = {m.strip() for m in text.split(",") if m.strip()}
    if "all" in wanted:
        return MODES
    unknown = wanted - set(MODES)
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} or all; got {text!r}")
    return tuple(m for m in MODES if m in wanted)


def parse_backends(text: str) -> tuple[str, ...] | None:
    """A comma list of backend names (of the sweep, --sparsity or --decode), or None for
    "all"."""
    from flashjax.bench import decode_backends
    from flashjax.bench.backends import BACKEND_NAMES
    from flashjax.bench.sparsity_backends import NAMES

    decode = (n for n in decode_backends.names() if not n.startswith("flashjax_paged"))
    known = tuple(dict.fromkeys((*BACKEND_NAMES, *NAMES, *decode)))
    names = [b.strip() for b in text.split(",") if b.strip()]
    known += tuple(b for b in names if re.fullmatch(r"flashjax_paged\d+", b))
    if not names or "all" in names:
        return None
    unknown = [b for b in names if b not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return tuple(dict.fromkeys(names))


def parse_percents(text: str) -> tuple[float, ...]:
    """ "5,10,25.5" -> (0.05, 0.1, 0.255): percentages in (0, 100]."""
    values = []
    for part in (p.strip().rstrip("%") for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if not 0 < value <= 100:
            raise argparse.ArgumentTypeError(f"a percentage in (0, 100]: {part!r}")
        values.append(value / 100)
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(values)


def parse_shapes(text: str) -> tuple:
    """ "1x8k,64x4k" -> (Shape(1, 8192), Shape(64, 4096)): B x S of --decode."""
    from flashjax.bench.decode import Shape

    shapes = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        batch, sep, seq = part.partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"a shape is BxS, e.g. 8x16k: {part!r}")
        shapes.append(Shape(parse_ints(batch)[0], parse_ints(seq)[0]))
    if not shapes:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(shapes)


def parse_dtype(text: str) -> str:
    """A dtype name or alias -> "bfloat16" / "float16" / "float32"."""
    from flashjax.bench.cases import DTYPES

    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(set(DTYPES.values()))}")
    return DTYPES[text.lower()]


def parse_window(text: str) -> tuple[int, int]:
    """ "256" -> (256, 256); "256,0" -> (256, 0)."""
    values = parse_ints(text, minimum=0)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError("window is LEFT or LEFT,RIGHT")


def default_out_dir(meta: dict[str, Any], suffix: str = "") -> Path:
    """`<tmp>/flashjax-bench/<date>-<device><suffix>`: outside the repository, so results never
    show up in `git status` (commit the ones worth keeping under benchmarks/results/ by hand)."""
    from flashjax.bench import machine

    name = f"{datetime.date.today().isoformat()}-{machine.slug(meta['device'])}{suffix}"
    return Path(tempfile.gettempdir()) / "flashjax-bench" / name


def header(meta: dict[str, Any], what: str = "") -> None:
    """The first line of a run's output (`what`: the mode, e.g. "--io"), and the CPU note."""
    from flashjax.bench import report

    run = f"flashjax bench {what}".rstrip()
    print(
        f"{run} on {meta['device']} ({meta['platform']}), "
        f"jax {meta['jax_version']}, commit {meta['git_commit']}",
        flush=True,
    )
    if meta["platform"] != "gpu":
        print("NOTE: " + report.CPU_NOTE + ".", flush=True)
