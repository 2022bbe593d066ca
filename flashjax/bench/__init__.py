"""`python -m flashjax bench`: attention benchmarks on the protocol of FlashAttention's papers.

Modules:
  flops     FLOP counts (causal, sliding window, backward = 2.5x forward)
  cases     the sweep's shapes, their inputs, the slice the reference checks
  backends  the implementations compared (flashjax, cuDNN, XLA, tokamax, torch), where available
  timing    warm-up, median of timed batches, device syncs (JAX) or CUDA events (torch)
  sweep     compile -> check against the reference -> time; failures become status rows
  machine   device, versions, commit, the machine's matmul ceiling
  report    JSON, CSV, PNG and the table
  hbm       --io's runner: which calls run (standard attention, the kernel at each tile), timing
  hbm_entries --io's config and what each call runs (shared by the runner and the ncu worker)
  hbm_model   the analytic HBM-traffic model (FlashAttention's Theorem 2)
  hbm_profile Nsight Compute's DRAM / L2 bytes of each call, in a worker process
  hbm_report  --io's table, plot and files
  ncu       Nsight Compute: its command line, its CSV, profiler ranges and call markers
  memory    --memory: XLA temp memory of forward+backward against sequence length
  sparsity  --sparsity: block-sparse time against density, the bar, the longest that fits
  sparsity_patterns  the block patterns (dense, butterfly, random) of --sparsity
  sparsity_backends  flashjax, chunked, XLA (dense mask), FlexAttention with one block pattern
  sparsity_report    --sparsity's table, plot and files
  cli       the command line
"""

from flashjax.bench.backends import Backend, JaxBackend, all_backends
from flashjax.bench.cases import Case, sweep_cases
from flashjax.bench.flops import attention_flops, visible_fraction
from flashjax.bench.sweep import run_sweep

__all__ = [
    "Backend",
    "Case",
    "JaxBackend",
    "all_backends",
    "attention_flops",
    "run_sweep",
    "sweep_cases",
    "visible_fraction",
]
