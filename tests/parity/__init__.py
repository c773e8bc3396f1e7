"""Parity with the original OmniMamba implementation (issue #9).

* `run_original_parity.py`: the GPU harness. It runs the ORIGINAL code (a checkout of hustvl/OmniMamba, given by path,
  never committed) next to `omnimamba_hf` at a tiny and at the full 1.3B width with fixed-seed random weights, and
  writes the golden references of the tiny configuration (`tests/fixtures/parity_tiny/`).
* `golden.py`: what both sides share: the port side of every compared quantity (`run_port`), the tolerances and the
  comparison (`compare_outputs`), and fixture loading. `tests/test_parity_golden.py` re-runs the port on CPU against
  the committed references with exactly this code.
* `cpu_stubs/`: minimal CPU stand-ins for `mamba_ssm`, `timm` and `torchvision`, used only by the harness's
  `--cpu-stubs` dry run (to check the plumbing where no GPU is at hand). Their outputs are never golden.

See docs/PARITY.md for the results.
"""
