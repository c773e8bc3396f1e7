"""Where does one decode step of OmniMamba-1.3B (bf16) spend its time? Kernel-level profile of the graph decoder's step
for each backend, the GEMV rates of the big projections against the copy bandwidth, and (--sweep) the launch
configurations of the fused Triton kernels.

    python benchmarks/profile_decode_step.py [--sweep] [--batches 1,2,4]

GEMVs are timed inside a CUDA graph over enough weight copies (> 200 MB) that the 50 MB L2 cache cannot serve them:
in a decode step every weight is read once, from HBM.
"""

import argparse
import itertools

import torch
from torch.profiler import ProfilerActivity, profile

from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
from omnimamba_hf.modeling import triton_decode_omnimamba as fused
from omnimamba_hf.modeling.graph_decode_omnimamba import OmniMambaGraphDecoder


def event_ms(fn, iters=100):
    for _ in range(10):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def graph_ms(fn, iters: int = 20, best_of: int = 1) -> float:
    """ms per replay (the best of `best_of` timings of `iters` replays) of `fn`'s launches captured as one CUDA graph;
    `fn` runs once eagerly first (compilation, allocations)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # synchronises before capturing
        fn()
    return min(event_ms(g.replay, iters) for _ in range(best_of))


def graph_us_per_call(calls) -> float:
    """Mean µs per call of a list of zero-argument launches, replayed as one CUDA graph."""
    return graph_ms(lambda: [c() for c in calls]) * 1e3 / len(calls)


def copies_for(shape, dtype=torch.bfloat16, min_bytes=200 << 20):
    n = max(2, -(-min_bytes // (shape[0] * shape[1] * 2)))
    return [torch.randn(shape, device="cuda", dtype=dtype) * 0.02 for _ in range(n)]


def sweep_one(name, shape, configs, launch, bw) -> dict:
    """Time `launch(weight, block_n, block_k, num_warps)` for each config over L2-defeating weight copies; print the
    five fastest; return the best as LAUNCH keyword arguments."""
    ws = copies_for(shape)
    rows = []
    for bn, bk, nwp in configs:
        if bn * bk > 16384:
            continue
        us = graph_us_per_call([lambda w=w: launch(w, bn, bk, nwp) for w in ws])
        rows.append((us, bn, bk, nwp))
    rows.sort()
    gbs = lambda us: shape[0] * shape[1] * 2 / us / 1e3  # noqa: E731
    for us, bn, bk, nwp in rows[:5]:
        print(f"sweep {name} {shape}: block_n {bn} block_k {bk} warps {nwp}: {us:.1f} us, {gbs(us):.0f} GB/s "
              f"({gbs(us) / bw:.0%} of copy)")  # fmt: skip
    return dict(block_n=rows[0][1], block_k=rows[0][2], num_warps=rows[0][3])


def sweep(bw):
    """Try launch configurations of the fused kernels on the 1.3B shapes; print µs and GB/s; return the best."""
    best = {}
    d, e = 2048, 4096
    res = torch.randn(1, d, device="cuda")
    nw = torch.ones(d, device="cuda", dtype=torch.bfloat16)
    configs = list(itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)))
    configs += [(2, 2048, 4), (2, 2048, 8), (4, 2048, 4), (4, 2048, 8)]  # whole rows: all loads before the wait
    for name, shape in (("in_proj", (8528, d)), ("head_t2i", (16384, d))):
        out = torch.empty(1, shape[0], device="cuda", dtype=torch.bfloat16)
        best[name] = sweep_one(
            name, shape, configs, lambda w, bn, bk, nwp: fused.rmsnorm_gemv(res, nw, w, out, 1e-5, bn, bk, nwp), bw
        )
    gated = torch.randn(1, e, device="cuda")
    gw = torch.ones(e, device="cuda", dtype=torch.bfloat16)
    resid = torch.zeros(1, d, device="cuda")
    conv = torch.zeros(1, e + 256, 4, device="cuda", dtype=torch.bfloat16)
    bc = torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16)
    configs = list(itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)))
    configs += [(1, 4096, 4), (1, 4096, 8), (2, 4096, 4), (2, 4096, 8)]  # whole rows: all loads before the wait
    best["out_proj"] = sweep_one(
        "out_proj", (d, e), configs,
        lambda w, bn, bk, nwp: fused.gated_norm_gemv(
            gated, gw, w, resid, conv, bc, 1e-5, d_inner=e, out_dtype=torch.bfloat16, block_n=bn, block_k=bk,
            num_warps=nwp,
        ),
        bw,
    )  # fmt: skip
    # cuBLAS for comparison, same L2-defeating rotation
    for shape in ((8512, d), (d, e), (16384, d)):
        ws = copies_for(shape)
        v = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
        us = graph_us_per_call([lambda w=w: torch.nn.functional.linear(v, w) for w in ws])
        print(f"cuBLAS GEMV {shape}: {us:.1f} us, {shape[0] * shape[1] * 2 / us / 1e3:.0f} GB/s")
    return best


def tensor_core_sweep(model, bw, batches, tune=True):
    """Tune the tensor-core GEMVs (LAUNCH_TENSOR_CORES) at 16 rows (unless not `tune`), then time the fused step on
    them against the mamba-ssm kernels + cuBLAS backend at each batch size."""
    if tune:
        tune_tensor_cores(bw)
    print("tensor-core configurations:", fused.LAUNCH_TENSOR_CORES)
    time_fused_vs_kernels(model, batches)


def tune_tensor_cores(bw):
    d, e, rows = 2048, 4096, 16
    res, nw = torch.randn(rows, d, device="cuda"), torch.ones(d, device="cuda", dtype=torch.bfloat16)
    gated, gw = torch.randn(rows, e, device="cuda"), torch.ones(e, device="cuda", dtype=torch.bfloat16)
    gated_sumsq = gated.pow(2).view(rows, 256, -1).sum(-1)  # as the conv + SSM kernel writes them
    resid = torch.zeros(rows, d, device="cuda")
    conv = torch.zeros(rows, e + 256, 4, device="cuda", dtype=torch.bfloat16)
    bc = torch.zeros(rows, 256, device="cuda", dtype=torch.bfloat16)
    tiles = ((64, 128, 4), (128, 128, 8), (128, 64, 8), (64, 64, 4))
    configs = list(itertools.product(tiles, (3, 4), (1, 2, 4, 8)))
    workspace = fused.SplitKWorkspace(torch.device("cuda"))
    for name, shape in (("in_proj", (8528, d)), ("head", (16384, d)), ("out_proj", (d, e))):
        ws = copies_for(shape)
        if name == "out_proj":
            def launch(w, tile, stages, split):
                fused.gated_norm_gemv(gated, gw, w, resid, conv, bc, 1e-5, d_inner=e, out_dtype=torch.bfloat16,
                                      block_n=tile[0], block_k=tile[1], num_warps=tile[2], tensor_cores=True,
                                      num_stages=stages, split_k=split, workspace=workspace,
                                      gated_sumsq=gated_sumsq)  # fmt: skip
        else:
            out = torch.empty(rows, shape[0], device="cuda", dtype=torch.bfloat16)

            def launch(w, tile, stages, split):
                fused.rmsnorm_gemv(res, nw, w, out, 1e-5, *tile, tensor_cores=True, num_stages=stages, split_k=split,
                                   workspace=workspace)  # fmt: skip
        timed = []
        for c in configs:
            try:
                launch(ws[0], *c)  # compile, and grow the workspace before capture
                timed.append((graph_us_per_call([lambda w=w: launch(w, *c) for w in ws]), c))
            except Exception as exc:  # e.g. out of shared memory for this tile / stage count
                print(f"tensor cores {name} {c}: {type(exc).__name__}")
        timed.sort()
        for us, (tile, stages, split) in timed[:4]:
            gbs = shape[0] * shape[1] * 2 / us / 1e3
            print(f"tensor cores, {rows} rows, {name} {shape}: block_n {tile[0]} block_k {tile[1]} warps {tile[2]} "
                  f"stages {stages} split_k {split}: {us:.1f} us, {gbs:.0f} GB/s ({gbs / bw:.0%} of copy)")  # fmt: skip
        (bn, bk, warps), stages, split = timed[0][1]
        fused.LAUNCH_TENSOR_CORES[name] = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split_k=split)


def kernel_breakdown(model, batches):
    """Per-kernel device time of one fused T2I step (PDL off, so no kernel's time includes waiting for the previous
    one), kernels assigned to their role by launch order: embedding, then (in_proj, conv + SSM, out_proj) per layer,
    then the head."""
    import os

    previous = os.environ.get("OMNIMAMBA_PDL")
    os.environ["OMNIMAMBA_PDL"] = "0"
    fused.use_pdl.cache_clear()
    V, layers = model.config.text_vocab_size, model.config.text_config.num_hidden_layers
    for batch in batches:
        dec = OmniMambaGraphDecoder(model, "t2i", batch, backend="fused", use_graph=False)
        tok = torch.full((batch,), V + 1, device="cuda")
        with torch.no_grad():
            for _ in range(3):
                dec.step(tok, 80)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                dec.step(tok, 80)
                torch.cuda.synchronize()
        kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        decode = [e for e in kernels if "norm_gemm" in e.name or "norm_gemv" in e.name or "conv_ssm" in e.name]
        first = kernels.index(decode[0])
        roles = {"embedding": sum(e.time_range.elapsed_us() for e in kernels[:first])}
        for i, e in enumerate(decode[: 3 * layers]):
            key = ("in_proj", "conv + SSM", "out_proj")[i % 3]
            roles[key] = roles.get(key, 0) + e.time_range.elapsed_us()
        roles["head"] = sum(e.time_range.elapsed_us() for e in decode[3 * layers :])
        total = sum(roles.values())
        print(f"batch {batch} fused step, PDL off, per-kernel device time: " + ", ".join(
            f"{k} {v / 1e3:.3f} ms ({v / layers:.1f} us/layer)" if k not in ("embedding", "head") else f"{k} {v / 1e3:.3f} ms"
            for k, v in roles.items()) + f"; sum {total / 1e3:.3f} ms")  # fmt: skip
        dec.release()
    if previous is None:
        del os.environ["OMNIMAMBA_PDL"]
    else:
        os.environ["OMNIMAMBA_PDL"] = previous
    fused.use_pdl.cache_clear()


def timeline(model, batch, replays=20):
    """Where the graph replay's wall time goes, kernel by kernel (fused backend, PDL as configured): CUPTI start / end
    of every kernel of `replays` replays, kernels assigned to roles by launch order as in `kernel_breakdown`. Per role:
    the mean duration, the gap from the previous kernel's end to this one's start (negative: it started early, PDL),
    and the increment of the step's end, end(k) - end(k-1): these sum to the step's time, so they say what each kernel
    adds to the critical path."""
    V = model.config.text_vocab_size
    for task, code_table in (("t2i", True), ("t2i", False), ("mmu", None)):
        model.reset_graph_decoders()
        dec = OmniMambaGraphDecoder(model, task, batch, backend="fused", code_table=code_table)
        tok = torch.full((batch,), V + 1 if task == "t2i" else 100, device="cuda")
        step_ms = event_ms(lambda: dec.step(tok, 80))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                dec.step(tok, 80)
            torch.cuda.synchronize()
        kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        kernels = [e for e in kernels if "Memcpy" not in e.name and "Memset" not in e.name]
        per_step = len(kernels) // replays
        stats = {}
        for r in range(replays):
            step = kernels[r * per_step : (r + 1) * per_step]
            first = next(i for i, e in enumerate(step) if any(k in e.name for k in ("norm_gemv", "norm_gemm", "in_proj_ssm")))
            role = None
            for i, e in enumerate(step):
                if i < first:
                    role = "embedding"
                elif i == len(step) - 1:
                    role = "head"
                elif "in_proj_ssm" in e.name:
                    role = "in_proj + conv + SSM"
                elif "conv_ssm" in e.name:
                    role = "conv + SSM"
                else:  # the GEMV kernels: out_proj follows the conv + SSM step
                    role = "out_proj" if role in ("in_proj + conv + SSM", "conv + SSM") else "in_proj"
                s = stats.setdefault(role, [0.0, 0.0, 0.0, 0])
                s[0] += e.time_range.elapsed_us()
                if i:
                    prev = step[i - 1].time_range
                    s[1] += e.time_range.start - prev.end
                    s[2] += e.time_range.end - max(k.time_range.end for k in step[:i])
                s[3] += 1
            if r == 0:
                span = step[-1].time_range.end - step[0].time_range.start
        table = {True: ", image-code table", False: ", per-step image-embedding MLP", None: ""}[code_table]
        print(f"timeline, {task}{table}, batch {batch}: replay {step_ms * 1e3:.0f} us/step (events), {per_step} kernels/step, "
              f"first start to last end {span:.0f} us")  # fmt: skip
        for role, (dur, gap, inc, count) in stats.items():
            per = count / replays
            print(f"  {role:10s} x{per:3.0f}/step: duration {dur / count:6.2f} us, gap {gap / count:+6.2f} us, "
                  f"adds {inc / count:6.2f} us to the step ({inc / replays:7.1f} us/step)")  # fmt: skip
        dec.release()


def fresh_t2i_step_ms(model, batch, backend="auto") -> tuple[float, str]:
    """(best of three timings of a T2I graph step in ms, the backend) for a decoder built now, so that changes to
    LAUNCH / LAUNCH_TENSOR_CORES take effect."""
    model.reset_graph_decoders()
    dec = model.graph_decoder("t2i", batch, backend=backend)
    tok = torch.full((batch,), model.config.text_vocab_size + 1, device="cuda")
    return min(event_ms(lambda: dec.step(tok, 80)) for _ in range(3)), dec.backend


def step_sweep(model, batch=1):
    """Launch configurations tuned inside the whole step rather than per GEMV: each kernel's weight prefetch before
    its PDL wait overlaps the previous kernel, which a standalone sweep (--sweep) does not see. Varies one kernel's
    configuration at a time from the current LAUNCH, times the T2I step (graph replay), keeps the fastest (as a plain
    entry, for every batch size: rerun --interleaved-sweep 1,2,3 before making a batch-1 winner the default)."""
    # (block_n, block_k, warps, stages): stages > 1 pipelines the weight tiles after the first through shared memory
    # (cp.async, `_norm_gemv_kernel` STAGES); the first (earlier) sweep had stages 1 only (session 7, step_sweep.log)
    candidates = {
        "out_proj": [(8, 1024, 8, 1), (8, 1024, 8, 2), (8, 1024, 8, 3), (8, 1024, 8, 4), (8, 512, 8, 4), (8, 512, 8, 6),
                     (4, 1024, 4, 4), (16, 512, 8, 3), (8, 512, 4, 6), (4, 512, 4, 6)],
        "in_proj": [(4, 1024, 4, 2), (4, 2048, 8, 1), (4, 1024, 8, 2), (4, 512, 8, 4), (8, 512, 8, 4), (8, 1024, 8, 2),
                    (4, 512, 4, 4), (2, 1024, 4, 2)],
        "head": [(2, 2048, 4, 1), (2, 512, 4, 4), (4, 512, 8, 4), (2, 1024, 4, 2)],
    }
    for name, configs in candidates.items():
        timed = []
        for bn, bk, w, st in configs:
            fused.LAUNCH[name] = dict(block_n=bn, block_k=bk, num_warps=w, stages=st)
            try:
                timed.append((fresh_t2i_step_ms(model, batch, "fused")[0], bn, bk, w, st))
            except Exception as exc:  # noqa: BLE001 (e.g. out of resources)
                print(f"step sweep {name} {(bn, bk, w, st)}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            print(f"step sweep, batch {batch}, {name} block_n {bn} block_k {bk} warps {w} stages {st}: "
                  f"{timed[-1][0]:.4f} ms/step")  # fmt: skip
        best = min(timed)
        fused.LAUNCH[name] = dict(block_n=best[1], block_k=best[2], num_warps=best[3], stages=best[4])
        print(f"step sweep: best {name} {fused.LAUNCH[name]} at {best[0]:.4f} ms/step")
    block_p_sweep(model, [batch], values=((16, 4), (32, 4), (64, 4)))


def interleaved_sweep(model, batches=(1,), rounds=4):
    """T2I and MMU steps (graph replay, fresh decoders) for a few LAUNCH configurations against the current
    LAUNCH, interleaved over `rounds` passes so that drift between decoders shows; prints each pass and the median per
    configuration, and the T2I in-graph decode (greedy, one-launch choice) per token. Restores LAUNCH. Edit
    `variants` for the question at hand."""
    import importlib

    from omnimamba_hf.modeling import graph_decode_omnimamba as graph_decode
    from omnimamba_hf.modeling.graph_decode_omnimamba import FusedChoice

    saved = dict(fused.LAUNCH)
    # A GEMV variant reads {"in_proj": dict(block_n=4, block_k=2048, num_warps=8, stages=1)}; a batch-1-only one goes
    # in the entry's `one_row`. The ninth session compared 2-8 rows x 512-2048 columns, 2-8 warps, 1-4 stages for
    # in_proj, out_proj and the head at batch 1 (its interleaved_sweep_*.log). The tenth timed Gluon GEMVs that copy
    # whole weight slices into shared memory before the PDL wait, and the token choice launched with PDL (variants and
    # kernel in docs/attempts/gluon_prefetch_gemv_and_choice_pdl.diff; interleaved_sweep_prefetch*.log): all slower or
    # even. Its second question, below: rows per conv + SSM program at batch 1 (block_p 32 was 18 µs faster than 64
    # at batch 1 in the seventh session's block_p_warps_sweep.log, but 64 won at 16 and 64 rows). Answer: 32 rows x 4
    # warps 1.1227 vs 1.1253 ms per T2I step, noise-level (interleaved_sweep_ssm_block_p.log); 16 rows or 2 warps
    # are slower.
    # A variant may also swap in another conv + SSM kernel: {"conv_ssm_module": "_ab_x"} uses `conv_ssm_step` of
    # benchmarks/_ab_x.py, a copy of modeling/triton_decode_omnimamba.py with the kernel edited (not committed; the
    # copy's own LAUNCH["ssm_num_warps"] applies). The eleventh session compared restructured kernels that way, with
    # an unchanged copy as the control (0.6-1.1 µs from the in-tree kernel; interleaved_sweep_conv_ssm_5_control.log),
    # and a kernel with almost nothing to do after its wait (a bound: 40 µs per step); see docs/BENCHMARKS.md,
    # "Fewer barriers after the wait" (interleaved_sweep_conv_ssm_*.log, docs/attempts/conv_ssm_fewer_barriers.diff).
    variants = {"current": {}, **{f"ssm block_p {bp}, {w} warps": {"ssm_block_p": bp, "ssm_num_warps": w}
                                  for bp, w in ((32, 4), (32, 2), (16, 4), (16, 2))}}  # fmt: skip
    V = model.config.text_vocab_size
    for batch in batches:
        times = {name: {"t2i": [], "mmu": [], "decode": []} for name in variants}
        for r in range(rounds):
            for name, change in variants.items():
                fused.LAUNCH.update(saved)
                fused.LAUNCH.update({k: v for k, v in change.items() if k != "conv_ssm_module"})
                if "conv_ssm_module" in change:
                    graph_decode.conv_ssm_step = importlib.import_module(change["conv_ssm_module"]).conv_ssm_step
                for task in ("t2i", "mmu"):
                    model.reset_graph_decoders()
                    dec = model.graph_decoder(task, batch, backend="fused")
                    tok = torch.full((batch,), V + 1 if task == "t2i" else 100, device="cuda")
                    times[name][task].append(min(event_ms(lambda: dec.step(tok, 80)) for _ in range(3)))
                    if task == "t2i":  # 64 steps with the choice in the graph, per token
                        first = torch.zeros(batch, dtype=torch.long, device="cuda")
                        run = lambda: dec.decode(first, 80, 64, choose=FusedChoice(), offset=V)  # noqa: E731
                        times[name]["decode"].append(min(event_ms(run, 5) for _ in range(3)) / 64)
                graph_decode.conv_ssm_step = fused.conv_ssm_step
                print(f"batch {batch}, round {r}, {name}: T2I {times[name]['t2i'][-1]:.4f} ms/step, "
                      f"MMU {times[name]['mmu'][-1]:.4f}, T2I decode {times[name]['decode'][-1]:.4f} ms/token")  # fmt: skip
        for name, t in times.items():
            med = {task: sorted(v)[len(v) // 2] for task, v in t.items()}
            print(f"batch {batch}, median of {rounds}, {name}: T2I {med['t2i']:.4f} ms/step, MMU {med['mmu']:.4f}, "
                  f"T2I decode {med['decode']:.4f} ms/token")  # fmt: skip
    fused.LAUNCH.clear()
    fused.LAUNCH.update(saved)
    model.reset_graph_decoders()


def tensor_core_step_sweep(model, batches=(4, 16)):
    """The tensor-core GEMM configurations (LAUNCH_TENSOR_CORES, tuned standalone at 16 rows) varied one at a time
    inside whole fused steps at each batch size; prints T2I ms per step, restores LAUNCH_TENSOR_CORES."""
    saved = {k: dict(v) for k, v in fused.LAUNCH_TENSOR_CORES.items()}
    candidates = {
        "in_proj": [(128, 128, 8, 4, 1), (64, 128, 4, 4, 1), (128, 64, 8, 4, 1), (64, 256, 4, 3, 1), (128, 128, 8, 3, 2)],
        "out_proj": [(128, 128, 8, 3, 8), (128, 128, 8, 3, 4), (64, 128, 4, 3, 4), (64, 128, 4, 4, 8), (128, 64, 8, 4, 8)],
        "head": [(128, 128, 8, 3, 1), (64, 128, 4, 4, 1), (128, 128, 8, 3, 2)],
    }
    for batch in batches:
        for name, configs in candidates.items():
            for bn, bk, w, st, sk in configs:
                fused.LAUNCH_TENSOR_CORES[name] = dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sk)
                try:
                    ms = fresh_t2i_step_ms(model, batch, "fused")[0]
                except Exception as exc:  # noqa: BLE001 (e.g. out of shared memory)
                    print(f"batch {batch} {name} {(bn, bk, w, st, sk)}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                print(f"batch {batch} T2I fused step, tensor-core {name} block_n {bn} block_k {bk} warps {w} "
                      f"stages {st} split_k {sk}: {ms:.4f} ms/step")  # fmt: skip
            fused.LAUNCH_TENSOR_CORES[name] = dict(saved[name])
    model.reset_graph_decoders()


def block_p_sweep(model, batches, values=((16, 4), (32, 4), (64, 4), (64, 8))):
    """T2I step time (graph replay, the backend "auto" picks) for each (head-dim rows, warps) per program of the
    conv + SSM kernel (LAUNCH["ssm_block_p"], LAUNCH["ssm_num_warps"]); restores LAUNCH afterwards."""
    saved = fused.LAUNCH["ssm_block_p"], fused.LAUNCH["ssm_num_warps"]
    for batch in batches:
        for bp, warps in values:
            fused.LAUNCH["ssm_block_p"], fused.LAUNCH["ssm_num_warps"] = bp, warps
            ms, backend = fresh_t2i_step_ms(model, batch)
            print(f"batch {batch} T2I {backend} step, ssm_block_p {bp}, {warps} warps: {ms:.4f} ms/step")
    fused.LAUNCH["ssm_block_p"], fused.LAUNCH["ssm_num_warps"] = saved
    model.reset_graph_decoders()


def time_fused_vs_kernels(model, batches):
    V = model.config.text_vocab_size
    for batch in batches:
        for task in ("t2i", "mmu"):
            tok = torch.full((batch,), V + 1 if task == "t2i" else 100, device="cuda")
            times = {}
            for backend in ("fused", "kernels", "hybrid"):
                try:
                    dec = OmniMambaGraphDecoder(model, task, batch, backend=backend)
                    times[backend] = event_ms(lambda: dec.step(tok, 80))
                    dec.release()
                except Exception as exc:  # e.g. a tile configuration out of shared memory at this batch size
                    print(f"batch {batch} {task} {backend}: {type(exc).__name__}: {str(exc)[:120]}")
                    times[backend] = float("nan")
            print(f"batch {batch} {task}: fused (tensor cores) {times['fused']:.3f} ms/step, kernels "
                  f"{times['kernels']:.3f} ms/step ({times['kernels'] / times['fused']:.2f}x), hybrid "
                  f"{times['hybrid']:.3f} ms/step")  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="tune the fused kernels' launch configurations first")
    parser.add_argument("--batches", default="1", help="batch sizes for the per-backend step timing")
    parser.add_argument("--backends", default="fused,kernels", help="graph-decoder backends to profile")
    parser.add_argument("--tensor-core-sweep", default="", help="e.g. 4,8,16,32,64: tune the batched GEMVs, time steps")
    parser.add_argument("--no-tune", action="store_true", help="with --tensor-core-sweep: time steps only")
    parser.add_argument("--kernel-breakdown", default="", help="e.g. 1,4,16: per-kernel time of one fused step")
    parser.add_argument("--tensor-core-step-sweep", default="", help="e.g. 4,16: tensor-core configs inside steps")
    parser.add_argument("--block-p-sweep", default="", help="e.g. 16,64: conv + SSM rows per program, per batch")
    parser.add_argument("--step-sweep", action="store_true", help="tune launch configurations inside the whole step")
    parser.add_argument("--interleaved-sweep", default="", help="e.g. 1,2,3: a few LAUNCH configs vs the current, A/B, per batch")
    parser.add_argument("--timeline", type=int, default=0, help="batch size: per-role critical-path times of the fused step")
    parser.add_argument("--profile-batch", type=int, default=1, help="batch size of the kernel-level profile")
    parser.add_argument("--ssm-state-dtype", default="float32", choices=["float32", "model"],
                        help="config.ssm_state_dtype: the recurrent state in float32 or in the model dtype (bf16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = 1 << 30
    x, y = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    bw = 2 * n / (event_ms(lambda: y.copy_(x), 20) / 1e3) / 1e9
    del x, y
    print(f"copy bandwidth {bw:.0f} GB/s")
    if args.sweep:
        best = sweep(bw)
        print("best launch configurations:", best)
        fused.LAUNCH["in_proj"] = best["in_proj"]
        fused.LAUNCH["head"] = best["head_t2i"]
        fused.LAUNCH["out_proj"] = best["out_proj"]
    with torch.device("cuda"):
        model = OmniMambaForConditionalGeneration(OmniMambaConfig()).to(torch.bfloat16).eval()
    model.config.ssm_state_dtype = args.ssm_state_dtype
    print(f"SSM state dtype: {args.ssm_state_dtype}")
    if args.tensor_core_step_sweep:
        tensor_core_step_sweep(model, [int(b) for b in args.tensor_core_step_sweep.split(",")])
        return
    if args.block_p_sweep:
        block_p_sweep(model, [int(b) for b in args.block_p_sweep.split(",")])
        return
    if args.interleaved_sweep:
        interleaved_sweep(model, [int(b) for b in args.interleaved_sweep.split(",")])
        return
    if args.step_sweep:
        step_sweep(model)
    if args.timeline:
        timeline(model, args.timeline)
        return
    if args.kernel_breakdown:
        kernel_breakdown(model, [int(b) for b in args.kernel_breakdown.split(",")])
        return
    if args.tensor_core_sweep:
        tensor_core_sweep(model, bw, [int(b) for b in args.tensor_core_sweep.split(",")], tune=not args.no_tune)
        return
    V = model.config.text_vocab_size
    backends = args.backends.split(",")
    if args.sweep and "fused" in backends:
        for bp in (16, 32, 64):
            fused.LAUNCH["ssm_block_p"] = bp
            model.reset_graph_decoders()
            dec = model.graph_decoder("t2i", 1, backend="fused")
            tok = torch.full((1,), V + 1, device="cuda")
            print(f"fused step with SSM block_p {bp}: {event_ms(lambda: dec.step(tok, 80)):.3f} ms")
    for batch in [int(b) for b in args.batches.split(",")]:
        for backend in backends:
            model.reset_graph_decoders()
            for task in ("t2i", "mmu"):
                dec = model.graph_decoder(task, batch, backend=backend)
                tok = torch.full((batch,), V + 1 if task == "t2i" else 100, device="cuda")
                print(f"batch {batch} {task} {backend}: graph replay {event_ms(lambda: dec.step(tok, 80)):.3f} ms/step")
    if "fused" in backends:  # programmatic dependent launch on / off
        import os

        for pdl in ("0", "1"):
            os.environ["OMNIMAMBA_PDL"] = pdl
            fused.use_pdl.cache_clear()
            model.reset_graph_decoders()
            dec = model.graph_decoder("t2i", 1, backend="fused")
            tok = torch.full((1,), V + 1, device="cuda")
            print(f"fused step, PDL {'on' if pdl == '1' else 'off'}: {event_ms(lambda: dec.step(tok, 80)):.3f} ms")
    for backend in backends:
        model.reset_graph_decoders()
        dec = model.graph_decoder("t2i", args.profile_batch, backend=backend)
        tok = torch.full((args.profile_batch,), V + 1, device="cuda")
        graph_ms = event_ms(lambda: dec.step(tok, 80))
        with torch.no_grad():
            for _ in range(5):
                dec._fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    dec._fn()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
        total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 10 / 1e3
        count = sum(e.count for e in events) / 10
        print(f"\n== backend {backend}, batch {args.profile_batch}: graph replay {graph_ms:.3f} ms/step; kernels {count:.0f}/step, "
              f"sum of kernel time {total:.3f} ms/step")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
