"""Registers and spills of the fused decode kernels (modeling/triton_decode_omnimamba.py), compiled for sm_90 on any
machine — no GPU needed: Triton compiles to PTX here and its bundled `ptxas` reports the allocation.

    python benchmarks/kernel_registers.py [--arch sm_90a]

Why: a decode-step GEMV streams weights, and how many loads it keeps in flight depends on how many programs fit on an
SM, i.e. on registers per thread. A kernel change that looks harmless can triple the count (an attempt that ran the
per-head SSM step inside the in_proj GEMV went from 57 to 170-255 registers and from 1.25 to 2.3 ms per step;
docs/DEVELOPING.md). Check here before spending device time. For the conv + SSM kernel, whose time is latency,
it also counts what runs after the PDL wait (barriers, shuffles; `after_wait`) — a count, not a prediction: the
eleventh session cut its barriers from 24 to 11 and the step got 14 µs slower (docs/BENCHMARKS.md, "Fewer barriers
after the wait"). Only whole-step timings decide.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from omnimamba_hf.modeling import triton_decode_omnimamba as fused


def compile_ptx(kernel, types: dict, constexprs: dict, num_warps: int, arch: str) -> str:
    """The PTX of `kernel` compiled with these argument types and constants."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: types.get(n, "constexpr") for n in names}
    # As at a real launch, where Triton specialises pointers and integers divisible by 16: without that hint it cannot
    # prove 16-byte alignment, loads no bf16 tile with cp.async, and the counts come out far too high.
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t[0] == "*" or
               (n.startswith("stride") and t == "i32")}  # fmt: skip
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
        target=GPUTarget("cuda", int(re.sub(r"\D", "", arch)), 32),
        options={"num_warps": num_warps},
    )
    return compiled.asm["ptx"]


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that the bundled `ptxas` reports for `ptx`."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    text = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores", text)
    return regs, int(spill.group(1)) if spill else 0


def ptxas_report(kernel, types: dict, constexprs: dict, num_warps: int, arch: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of `kernel` compiled with these argument types and constants."""
    return ptxas_usage(compile_ptx(kernel, types, constexprs, num_warps, arch), arch)


def after_wait(ptx: str) -> dict:
    """Counts of what a kernel runs after its `griddepcontrol.wait`, i.e. on the step's critical path: block-wide
    barriers (each `convert_layout` between register layouts goes through shared memory between two of them), warp
    shuffles (reductions), shared and global loads / stores."""
    tail = ptx[ptx.index("griddepcontrol.wait"):]
    ops = {"bar.sync": r"\bbar\.sync", "shfl": r"\bshfl\.", "ld.shared": r"\bld\.shared", "st.shared": r"\bst\.shared",
           "ld.global": r"\bld\.global", "st.global": r"\bst\.global"}  # fmt: skip
    return {name: len(re.findall(pattern, tail)) for name, pattern in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90a")
    args = parser.parse_args()
    d, d_inner, heads, p, n, r = 2048, 4096, 64, 64, 128, 8  # the released 1.3B shapes
    gemv_types = {
        "x_ptr": "*fp32", "norm_w_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "conv_ptr": "*bf16",
        "bc_new_ptr": "*bf16", "N": "i32", "eps": "fp32", "stride_x": "i32", "stride_w": "i32", "stride_out": "i32",
        "stride_conv": "i32", "stride_bc": "i32",
    }  # fmt: skip
    for name, k, extra in (
        ("in_proj", d, dict(ACCUMULATE=False, OUT_DTYPE=tl.float32, BC=0, D_INNER=0, KW=1)),
        ("head", d, dict(ACCUMULATE=False, OUT_DTYPE=tl.float32, BC=0, D_INNER=0, KW=1)),
        ("out_proj", d_inner, dict(ACCUMULATE=True, OUT_DTYPE=tl.bfloat16, BC=2 * n, D_INNER=d_inner, KW=4)),
    ):
        for rows in (1, 2, 3):
            launch = fused._for_rows(fused.LAUNCH[name], rows)
            types = dict(gemv_types, out_ptr="*fp32" if name == "out_proj" else "*bf16")
            stages = fused.gemv_stages(launch.get("stages", 1), rows, launch["block_k"], k)
            consts = dict(K=k, BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"], ROWS=rows,
                          ROWS_P2=triton.next_power_of_2(rows), PDL=True, STAGES=stages, **extra)  # fmt: skip
            regs, spill = ptxas_report(fused._norm_gemv_kernel, types, consts, launch["num_warps"], args.arch)
            print(f"_norm_gemv_kernel {name:8s} {launch} batch {rows}: {regs} registers, {spill} B spilled")
    for name, k, extra in (
        ("in_proj", d, dict(ACCUMULATE=False, OUT_DTYPE=tl.float32, BC=0, D_INNER=0, KW=1, SUMSQ_PARTS=0)),
        ("head", d, dict(ACCUMULATE=False, OUT_DTYPE=tl.float32, BC=0, D_INNER=0, KW=1, SUMSQ_PARTS=0)),
        ("out_proj", d_inner, dict(ACCUMULATE=True, OUT_DTYPE=tl.bfloat16, BC=2 * n, D_INNER=d_inner, KW=4,
                                   SUMSQ_PARTS=heads * p // fused.LAUNCH["ssm_block_p"])),
    ):  # fmt: skip
        launch = fused.LAUNCH_TENSOR_CORES[name]
        types = dict(gemv_types, out_ptr="*fp32" if name == "out_proj" else "*bf16", sumsq_ptr="*fp32",
                     part_ptr="*fp32", count_ptr="*i32", stride_sumsq="i32")  # fmt: skip
        for rows in (4, 16):
            consts = dict(K=k, BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"], ROWS=rows, ROWS_P2=16, PDL=True,
                          NUM_STAGES=launch["num_stages"], PRECISION="tf32", SPLIT=launch["split_k"], **extra)  # fmt: skip
            regs, spill = ptxas_report(fused._norm_gemm_tc_kernel, types, consts, launch["num_warps"], args.arch)
            print(f"_norm_gemm_tc_kernel {name:8s} {launch} batch {rows}: {regs} registers, {spill} B spilled")
    ssm_types = {
        "proj_ptr": "*bf16", "up_ptr": "*bf16", "conv_ptr": "*bf16", "conv_w_ptr": "*bf16", "conv_b_ptr": "*bf16",
        "dt_bias_ptr": "*bf16", "A_ptr": "*fp32", "D_ptr": "*bf16", "ssm_ptr": "*fp32", "gated_ptr": "*fp32",
        "bc_new_ptr": "*bf16", "gated_sumsq_ptr": "*fp32", "scaling": "fp32", "adapter_offset": "i32", "dt_lo": "fp32", "dt_hi": "fp32",
        "stride_proj": "i32", "stride_conv": "i32", "stride_ssm": "i32", "stride_gated": "i32", "stride_bc": "i32",
        "stride_gated_sumsq": "i32",
    }  # fmt: skip
    consts = dict(D_INNER=d_inner, HEADS=heads, GROUPS=1, P=p, BLOCK_P=fused.LAUNCH["ssm_block_p"], N=n, R=r, KW=4,
                  HAS_BIAS=True, HAS_LIMIT=False, PDL=True)  # fmt: skip
    for state in ("*fp32", "*bf16"):
        ptx = compile_ptx(fused._conv_ssm_step_kernel, dict(ssm_types, ssm_ptr=state), consts,
                          fused.LAUNCH["ssm_num_warps"], args.arch)  # fmt: skip
        regs, spill = ptxas_usage(ptx, args.arch)
        print(f"_conv_ssm_step_kernel block_p {consts['BLOCK_P']}, state {state[1:]}: {regs} registers, {spill} B "
              f"spilled; after the PDL wait: {after_wait(ptx)}")  # fmt: skip


if __name__ == "__main__":
    main()
