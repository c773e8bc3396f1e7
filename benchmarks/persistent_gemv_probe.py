"""Would a persistent decode kernel beat one launch per GEMV? A probe, not a model path.

The batch-1 decode step streams each block's in_proj (8528 x 2048) and out_proj (2048 x 4096) once, in a chain:
each GEMV's input is the previous one's output. Today every GEMV is its own launch (programmatic dependent launch
lets the next kernel's resident programs load their first weights early), and each launch adds ~2 µs over its
copy-bandwidth floor (docs/BENCHMARKS.md, "The step's input, and where a batch-1 step goes"). The route left open
for #8 is one persistent kernel that keeps the weights streaming across the dependencies: a fixed grid of programs
walks all 96 GEMVs, separated by grid-wide barriers, and loads its first weights of the next GEMV before it waits.

This probe times exactly that chain with no other work: 48 x (in_proj, out_proj) GEMVs of the 1.3B shapes in bf16,
- as a persistent kernel (grid barriers: an arrival counter polled with acquire atomics or volatile loads, or no
  barrier at all, to time the streaming alone), for a few grid sizes and tile shapes, and
- as 96 launches of the package's own batch-1 GEMV kernel (`rmsnorm_gemv`, batch 1's LAUNCH configurations, PDL),
  in a CUDA graph,
and prints both against the copy-bandwidth floor, with what reading alone reaches (torch.sum, a cuBLAS GEMV over 1 GB).

Ninth session, H100 (docs/benchmarks/2026-11-25-h100-session9/persistent_gemv_probe*.log): the 96 launches take
0.97 ms (1.18x the floor); the persistent chain 1.17 ms at best (1.42x), and 1.01 ms (1.22x) even with no barrier,
while torch.sum reads at 1.01x and cuBLAS' GEMV at 0.95x the copy bandwidth. So launch boundaries are not what keeps
the GEMVs from the floor; how each program keeps its loads in flight is (the next in_proj setting came from that).

Tenth session: `--launch-chain` times what a dependent launch costs with no work at all — 48 x 3 launches of a
kernel that waits for the previous one and passes a 16 KB row on, with the grids of in_proj, conv + SSM and
out_proj at batch 1 — and the 96-GEMV chain with the current LAUNCH (batch 1's `one_row` in_proj), skipping the
persistent kernels.

    PYTHONPATH=src:benchmarks python benchmarks/persistent_gemv_probe.py [--launch-chain]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from omnimamba_hf.modeling import triton_decode_omnimamba as fused
from profile_decode_step import event_ms, graph_ms


@triton.jit
def _wait_for(counter_ptr, target, POLL: tl.constexpr):
    """Spin until the grid-wide arrival counter reaches `target`: polling with acquire atomics (every poll a
    read-modify-write at L2) or with volatile loads (then the data is read with .cg loads, from L2, after the loop).
    POLL "none": no wait at all — wrong results, but the streaming alone, to tell the barrier's cost from the rest."""
    if POLL == "atomic":
        while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
            pass
    elif POLL == "volatile":
        while tl.load(counter_ptr, volatile=True) < target:
            pass


@triton.jit
def _chunk(table_ptr, m, i, pid, NP: tl.constexpr, N_IN: tl.constexpr, K_IN: tl.constexpr, N_OUT: tl.constexpr,
           K_OUT: tl.constexpr, TN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Pointers and mask of this program's i-th weight chunk [TN, BK] of GEMV m (even m: in_proj, odd: out_proj)."""
    odd = m % 2
    n = N_IN + (N_OUT - N_IN) * odd
    k = K_IN + (K_OUT - K_IN) * odd
    per_tile = k // BK
    tile = pid + (i // per_tile) * NP
    kc = i % per_tile
    rows = tile * TN + tl.arange(0, TN)
    w = tl.load(table_ptr + m).to(tl.pointer_type(tl.bfloat16))
    row_offsets = tl.multiple_of(rows * k, 16)
    ptrs = w + row_offsets[:, None] + (kc * BK + tl.arange(0, BK))[None, :]
    return ptrs, (rows < n)[:, None], rows, kc, per_tile


@triton.jit
def _persistent_chain_kernel(
    table_ptr, buf_in_ptr, buf_out_ptr, counter_ptr, PHASES: tl.constexpr, NP: tl.constexpr, N_IN: tl.constexpr,
    K_IN: tl.constexpr, N_OUT: tl.constexpr, K_OUT: tl.constexpr, TN: tl.constexpr, BK: tl.constexpr,
    POLL: tl.constexpr,
):  # fmt: skip
    """GEMV m reads x from one buffer and writes y to the other (in_proj: buf_in -> buf_out; out_proj: back)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BK)
    ptrs, mask, rows, kc, per_tile = _chunk(table_ptr, 0, 0, pid, NP, N_IN, K_IN, N_OUT, K_OUT, TN, BK)
    w = tl.load(ptrs, mask=mask, other=0.0)
    for m in range(PHASES):
        odd = m % 2
        n = N_IN + (N_OUT - N_IN) * odd
        k = K_IN + (K_OUT - K_IN) * odd
        tiles = ((n + TN - 1) // TN - pid + NP - 1) // NP  # tiles pid, pid + NP, ... (>= 0: pid < NP)
        chunks = tiles * (k // BK)
        if chunks == 0:  # no tile here: the chunk loaded for this GEMV is not this program's; load the next GEMV's
            ptrs, mask, rows, kc, per_tile = _chunk(table_ptr, tl.minimum(m + 1, PHASES - 1), 0, pid, NP, N_IN, K_IN,
                                                    N_OUT, K_OUT, TN, BK)  # fmt: skip
            w = tl.load(ptrs, mask=mask & (m + 1 < PHASES), other=0.0)
        x_ptr, y_ptr = buf_out_ptr, buf_in_ptr  # x: the previous GEMV's output (buf_out starts as the input)
        if odd == 1:
            x_ptr, y_ptr = buf_in_ptr, buf_out_ptr
        _wait_for(counter_ptr, m * NP, POLL)  # everybody finished GEMV m - 1
        acc = tl.zeros([TN, BK], dtype=tl.float32)
        for i in range(chunks):
            last = i == chunks - 1
            nm = m + last.to(tl.int32)
            ni = (i + 1) * (1 - last.to(tl.int32))
            ptrs, mask, rows, kc, per_tile = _chunk(table_ptr, tl.minimum(nm, PHASES - 1), ni, pid, NP, N_IN, K_IN,
                                                    N_OUT, K_OUT, TN, BK)  # fmt: skip
            w_next = tl.load(ptrs, mask=mask & (nm < PHASES), other=0.0)  # also the next GEMV's first chunk
            ptrs, mask, rows, kc, per_tile = _chunk(table_ptr, m, i, pid, NP, N_IN, K_IN, N_OUT, K_OUT, TN, BK)
            x = tl.load(x_ptr + kc * BK + cols, cache_modifier=".cg")
            acc += w.to(tl.float32) * x[None, :]
            if kc == per_tile - 1:
                scale = 1.0 / tl.sqrt(k.to(tl.float32))  # keeps the chain's values near 1
                tl.store(y_ptr + rows, tl.sum(acc, axis=1) * scale, mask=rows < n)
                acc = tl.zeros([TN, BK], dtype=tl.float32)
            w = w_next
        tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _link_kernel(x_ptr, y_ptr, N: tl.constexpr, PDL: tl.constexpr):
    """One link of a dependent chain with no work: every program reads the previous link's row, program 0 writes it
    on (+1), so each launch depends on the one before, as a decode step's kernels do."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, N)
    v = tl.load(x_ptr + offs)
    if tl.program_id(0) == 0:
        tl.store(y_ptr + offs, v + 1.0)


def launch_chain(layers: int = 48) -> None:
    """48 x 3 empty dependent launches with batch 1's grids (in_proj 2132 programs of 4 warps, conv + SSM 64 of 4,
    out_proj 256 of 8), in one CUDA graph, with and without PDL: the fixed cost per block of three launches."""
    a, b = torch.zeros(4096, device="cuda"), torch.zeros(4096, device="cuda")
    grids = ((2132, 4), (64, 4), (256, 8))
    for pdl in (True, False):
        extra = dict(launch_pdl=True) if pdl else {}

        def chain():
            x, y = a, b
            for _ in range(layers):
                for programs, warps in grids:
                    _link_kernel[(programs,)](x, y, N=4096, PDL=pdl, num_warps=warps, **extra)
                    x, y = y, x

        ms = graph_ms(chain, 50, best_of=3)
        print(f"empty dependent chain, PDL {pdl}: {layers} x 3 launches {ms * 1e3:.1f} us = {ms * 1e3 / layers:.2f} us "
              f"per block, {ms * 1e3 / (3 * layers):.2f} us per launch")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launch-chain", action="store_true", help="empty dependent launches + the 96 GEMVs only")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.launch_chain:
        launch_chain()
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    bw = 2 * n / (event_ms(lambda: dst.copy_(src), 20) / 1e3) / 1e9
    src = dst = None
    big = torch.randn(1 << 15, 1 << 14, device="cuda", dtype=torch.bfloat16)  # 1.07 GB: what can reading alone reach?
    vec = torch.randn(1 << 14, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("torch.sum", lambda: big.sum(dtype=torch.float32)), ("cuBLAS GEMV", lambda: big @ vec)):
        gbs = big.numel() * 2 / (min(event_ms(fn, 20) for _ in range(3)) / 1e3) / 1e9
        print(f"read only, {name} over 1.07 GB of bf16: {gbs:.0f} GB/s = {gbs / bw:.3f}x the copy bandwidth")
    big = vec = None
    layers, n_in, d, d_inner = 48, 8528, 2048, 4096
    weights = []
    for _ in range(layers):
        weights += [torch.randn(n_in, d, device="cuda", dtype=torch.bfloat16),
                    torch.randn(d, d_inner, device="cuda", dtype=torch.bfloat16)]  # fmt: skip
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    floor_ms = nbytes / (bw * 1e9) * 1e3
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy bandwidth {bw:.0f} GB/s; 48 x (in_proj {n_in}x{d}, "
          f"out_proj {d}x{d_inner}) bf16 = {nbytes / 1e9:.2f} GB, floor {floor_ms:.3f} ms")  # fmt: skip

    # baseline: the package's batch-1 GEMV, one launch each (PDL), replayed as one CUDA graph
    residual = torch.randn(1, d, device="cuda")
    proj = torch.zeros(1, n_in, device="cuda")
    ones_d, ones_inner = torch.ones(d, device="cuda", dtype=torch.bfloat16), torch.ones(d_inner, device="cuda",
                                                                                          dtype=torch.bfloat16)  # fmt: skip

    launch = fused.launch_configs(1, torch.bfloat16, residual.device)  # batch 1's (the ninth session's logs: before
    # its in_proj `one_row` setting, i.e. with whole in_proj rows per program)

    def launches():
        for i in range(layers):
            fused.rmsnorm_gemv(residual, ones_d, weights[2 * i], proj, 1e-5, **launch["in_proj"])
            fused.rmsnorm_gemv(proj[:, :d_inner], ones_inner, weights[2 * i + 1], residual, 1e-5,
                               **launch["out_proj"])  # fmt: skip

    ms = graph_ms(launches, 20, best_of=3)
    print(f"96 launches (LAUNCH configs, PDL {fused.use_pdl(residual.device)}): {ms:.3f} ms = {ms / floor_ms:.3f}x the "
          f"floor, {ms / (2 * layers) * 1e3:.2f} us per GEMV")  # fmt: skip
    if args.launch_chain:
        return

    table = torch.tensor([w.data_ptr() for w in weights], device="cuda", dtype=torch.int64)
    buf_in = torch.zeros(n_in, device="cuda")
    buf_out = torch.randn(max(n_in, d), device="cuda")
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    x0 = buf_out.clone()
    expected = x0
    for w in weights:  # the same chain in float32: each GEMV reads the previous one's output
        k = w.shape[1]
        expected = (w.float() @ expected[:k]) / k**0.5
    expected = expected[:d]
    configs = [(poll, 2, 8, 1024, 8) for poll in ("atomic", "volatile", "none")] + [("none", 2, 4, 2048, 8)]
    # (programs per SM, tile rows, tile columns, warps): each fits its programs per SM by registers
    # (benchmarks/kernel_registers.py's ptxas_report, sm_90a) — a grid that is not all resident would never pass a barrier
    configs += [("volatile", *c) for c in ((2, 4, 2048, 8), (3, 4, 1024, 4), (1, 8, 2048, 16), (3, 2, 2048, 4),
                                           (4, 2, 2048, 4))]  # fmt: skip
    for poll, per_sm, tn, bk, warps in configs:
        np_ = sms * per_sm

        def persistent():
            counter.zero_()
            _persistent_chain_kernel[(np_,)](
                table, buf_in, buf_out, counter, PHASES=2 * layers, NP=np_, N_IN=n_in, K_IN=d, N_OUT=d, K_OUT=d_inner,
                TN=tn, BK=bk, POLL=poll, num_warps=warps,
            )  # fmt: skip

        try:
            buf_out.copy_(x0)
            persistent()
            torch.cuda.synchronize()
            error = ((buf_out[:d] - expected).norm() / expected.norm()).item()  # "none": expected to be wrong
            ms = min(event_ms(persistent, 20) for _ in range(3))
        except Exception as exc:  # noqa: BLE001 (out of resources: the grid would not be resident)
            print(f"persistent {poll} polls, {per_sm}/SM, tile {tn}x{bk}, {warps} warps: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        print(f"persistent, {poll} polls, {np_} programs ({per_sm}/SM), tile {tn}x{bk}, {warps} warps: {ms:.3f} ms = "
              f"{ms / floor_ms:.3f}x the floor, {ms / (2 * layers) * 1e3:.2f} us per GEMV (incl. a counter reset); "
              f"result vs float32 torch chain: rel. error {error:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
