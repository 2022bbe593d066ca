"""What an `--io` run measures: its config and its entries (one call each: standard attention,
or flashjax's forward kernel at one tile), shared by the runner (`hbm`) and the worker process
Nsight Compute profiles (`hbm_profile`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flashjax import masks
from flashjax.bench import backends, cases
from pallas_kernels import configs
from pallas_kernels.operands import AttentionStatics, Operands
from pallas_kernels.triton import api

DEFAULT_NCU_TIMEOUT_S = 240.0


@dataclasses.dataclass(frozen=True)
class IOConfig:
    """One `--io` run: the shape, the tile sizes swept, and how ncu is used."""

    seqlens: tuple[int, ...]
    blocks: tuple[int, ...]
    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    causal: bool = False
    dtype: str = "bfloat16"
    vary: str = "both"
    ncu: str | None = None
    ncu_status: str = "no ncu"
    ncu_timeout_s: float = DEFAULT_NCU_TIMEOUT_S
    seed: int = 0


def flashjax_tiles(config: Any) -> Callable:
    """A bench `AttentionFn` running flashjax's forward kernel with the `KernelConfig` `config`
    (used for all three kernels, so the padding is the forward's own)."""

    def attention(q: Any, k: Any, v: Any, case: Any) -> Any:
        statics = AttentionStatics(
            scale=float(case.head_dim**-0.5), window=masks.window_of(case.causal, case.window)
        )
        whole = configs.AttentionConfig(config, config, config)
        out, _ = api.forward(Operands(q=q, k=k, v=v, statics=statics), config=whole)
        return out

    return attention


def standard_attention() -> Callable:
    """The baseline's `AttentionFn`: `jax.nn.dot_product_attention(implementation="xla")`."""
    return backends.dpa_call("jax.nn", "xla")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured call: an implementation at one sequence length (and tile)."""

    id: int
    impl: str  # "standard" or "flashjax"
    seq: int
    block: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def attention(self) -> Callable:
        if self.impl == "standard":
            return standard_attention()
        return flashjax_tiles(
            configs.KernelConfig(self.block_q, self.block_k, self.num_warps, self.num_stages)
        )


def case_of(cfg: IOConfig, seq: int) -> cases.Case:
    """The bench `Case` of one sequence length of the run."""
    return cases.Case(cfg.batch, seq, cfg.heads, cfg.head_dim, cfg.causal, cfg.dtype)
