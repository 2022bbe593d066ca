"""The analytic HBM-traffic model of `--io`: the bytes standard attention and flashjax's forward
kernel move between HBM and the chip (FlashAttention's Theorem 2, Fig. 2).

This module owns the model and nothing else: what runs and how it is timed is `hbm`, Nsight
Compute's measurement `hbm_profile`, the table and plot `hbm_report`.

Standard attention is `jax.nn.dot_product_attention(implementation="xla")`, modelled as the naive
algorithm (Algorithm 0 of the FlashAttention paper) in the dtypes XLA uses: per (batch, head), with
`e` the input dtype's item size,

  read Q, K (e*(T + S)*H)      -> write the float32 scores S = QK^T (4*T*S)
  read S (4*T*S)               -> softmax in float32, write P in the input dtype (e*T*S)
  read P, V (e*T*S + e*S*H)    -> write O (e*T*H)

so `2e(T + S)H + (8 + 2e)TS` bytes: Theta(N*d + N^2). Assumptions: the scale multiplies in the
GEMM's epilogue or the softmax's fusion (no extra pass), the softmax reads S once (XLA's fused
softmax; an unfused one reads it two or three times), and nothing stays in L2 between kernels
(ncu flushes caches before each profiled kernel, so measurement and model agree on this).

flashjax's forward (`pallas_kernels/triton/forward.py`) runs one program per (query block,
batch, head). A program loads its `block_q x H` query tile once, streams every key block that
`pallas_kernels.visibility.block_range` says it can see (K and V tiles, `block_k x H` each), and
writes its output tile and its float32 logsumexp once. `flash_forward_bytes` counts exactly that,
with the same `block_range` call the kernel makes and the kernel's padding (T, S up to multiples
of the tiles, H up to a power of two):

  e*Tp*Hp (Q) + 2*e*Hp*block_k*sum_i visited_i (K, V) + e*Tp*Hp (O) + 4*Tp (logsumexp)

Non-causal, every one of the `Tp / block_q` programs visits all `Sp / block_k` key blocks, so the
K, V term is `2*e*Sp*Hp*Tp/block_q`: every pass over K and V serves `block_q` queries. With on-chip
memory M the tile holds `block_q = Theta(M / d)` queries, hence `Theta(N^2 d^2 / M)` bytes for K, V
plus Theta(N*d) for Q and O: Theorem 2 of the paper. (FlashAttention-1 loops over key blocks
outside and query blocks inside, so there the pass count is `S / B_c`; this kernel's outer loop is
the grid over query blocks, so here it is `T / block_q`. `block_k` changes how finely K, V are
streamed, not how often: the model does not depend on it.) Causal attention visits about half of
the key blocks.

What the GPU measures differs from the model where its L2 (50 MB on an H100) serves re-reads: the
programs of one (batch, head) are launched together (query blocks are the grid's fastest axis), so
most K, V re-reads can hit L2 and DRAM may see little more than one pass over K and V.
`lts__t_bytes.sum` counts (about) the bytes the SMs asked L2 for, hits or misses: the traffic the
paper's two-level model (SRAM and HBM, no cache between) counts. Which of the two follows the model
is what the measurement shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flashjax import masks
from pallas_kernels import configs, visibility
from pallas_kernels.operands import AttentionStatics


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes an algorithm moves between HBM and the chip, by term (all batch elements and heads)."""

    reads: dict[str, int]
    writes: dict[str, int]

    @property
    def read(self) -> int:
        return sum(self.reads.values())

    @property
    def write(self) -> int:
        return sum(self.writes.values())

    @property
    def total(self) -> int:
        return self.read + self.write


def standard_forward_bytes(
    batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, itemsize: int
) -> Traffic:
    """HBM bytes of the naive algorithm as `jax.nn.dot_product_attention(implementation="xla")`
    runs it: float32 scores written and read once, probabilities in the input dtype written and
    read once (see the module docstring for the assumptions)."""
    bn, e = batch * heads, itemsize
    return Traffic(
        reads={
            "q": bn * seq_q * head_dim * e,
            "k": bn * seq_k * head_dim * e,
            "scores": bn * seq_q * seq_k * 4,
            "probs": bn * seq_q * seq_k * e,
            "v": bn * seq_k * head_dim * e,
        },
        writes={
            "scores": bn * seq_q * seq_k * 4,
            "probs": bn * seq_q * seq_k * e,
            "out": bn * seq_q * head_dim * e,
        },
    )


def visited_key_blocks(
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> np.ndarray:
    """Key blocks each query-block program of the forward kernel visits, `(Tp / block_q,)`.

    The kernel's own rule, `pallas_kernels.visibility.block_range`, for the programs of the padded
    rows (programs past the real rows visit nothing).
    """
    tp = -(-seq_q // block_q) * block_q
    starts = np.arange(tp // block_q, dtype=np.int32) * block_q
    statics = AttentionStatics(scale=1.0, window=masks.window_of(causal, window))
    lo, _, _, hi = visibility.block_range(statics, starts, block_q, block_k, (0, 0, seq_q, seq_k))
    return np.broadcast_to(np.asarray(hi) - np.asarray(lo), starts.shape).astype(np.int64)


def flash_forward_bytes(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    itemsize: int,
    block_q: int,
    block_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> Traffic:
    """HBM bytes of flashjax's forward kernel with tiles `block_q x block_k` (no caching between
    programs): Q read and O, logsumexp written once, K and V read once per visited key block."""
    hp = configs.head_dim_bucket(head_dim)
    tp = -(-seq_q // block_q) * block_q
    visits = int(visited_key_blocks(seq_q, seq_k, block_q, block_k, causal, window).sum())
    bn, e = batch * heads, itemsize
    kv_tile = block_k * hp * e
    return Traffic(
        reads={"q": bn * tp * hp * e, "k": bn * visits * kv_tile, "v": bn * visits * kv_tile},
        writes={"out": bn * tp * hp * e, "lse": bn * tp * 4},
    )


def tile_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int) -> int:
    """On-chip bytes of one program's operand tiles (Q, K, V; one pipeline stage): the `M` that
    Theorem 2 divides by."""
    return (block_q + 2 * block_k) * configs.head_dim_bucket(head_dim) * itemsize
