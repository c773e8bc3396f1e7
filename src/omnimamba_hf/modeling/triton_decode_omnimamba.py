"""Fused Triton kernels for one decode step: three launches per block instead of seven.

A batch-1 decode step is memory-bound: it must stream every block's `in_proj` (35 MB) and `out_proj` (17 MB) once.
With separate kernels (cuBLAS GEMVs + mamba-ssm's norm / conv / state-update kernels) each block costs ~40 µs on an
H100, of which ~14 µs are five small kernels that each take ~2.5 µs however little they do, and the cuBLAS GEMVs run
at 1.7–2.2 TB/s (docs/BENCHMARKS.md). Here one block is:

1. `rmsnorm_gemv`: prenorm RMSNorm folded into the `in_proj` GEMV (+ both adapters' `down` rows, fused_in_proj).
   The norm is a per-row scalar, so it is applied to the accumulator after the dot product: one pass over the
   weights, the residual's sum of squares accumulated on the way (no separate norm kernel, no second pass).
2. `conv_ssm_step`: per (row, head): task-adapter `up` + scaling, the depthwise causal-conv step with SiLU, the SSM
   state update (softplus dt, exp(dt·A) decay), `D` skip and the `silu(z)` gate.
3. `gated_norm_gemv`: the gated RMSNorm folded into the `out_proj` GEMV the same way, plus the residual add.

The final norm + head use kernel 1 again. Precision: float32 accumulation everywhere; the states are updated in place.
From batch 4 in bfloat16, kernels 1 and 3 (and the head) run as tensor-core GEMMs instead (`_norm_gemm_tc_kernel`,
`LAUNCH_TENSOR_CORES`; split-K for out_proj); kernel 2 then also writes partial sums of squares of the gated rows.
Semantics are those of `OmniMambaMixer._step` / `graph_decode_omnimamba._layer_step` (spec §3.2–3.4); the tests
check the fused step against them (tests/test_fused_decode.py on CPU through the Triton interpreter, tests/gpu).

A subtlety (why kernel 3 finishes kernel 2's work): the conv state of the B and C channels is shared by all heads of
a group, so no head program may overwrite it while others may still read it. Kernel 2 writes the new B/C inputs to a
small buffer and kernel 3 (launched after all of kernel 2 is done) shifts them into the conv state.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except Exception:  # triton is optional (CPU installs): the fused backend is then unavailable
    triton = None


@functools.cache
def fused_decode_available(device_type: str) -> bool:
    """Triton imports and can run on this device (CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests)."""
    if triton is None:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper+): each kernel starts while the previous one drains and streams its first
    weights before `griddepcontrol.wait`. OMNIMAMBA_PDL=0 turns it off."""
    if os.environ.get("OMNIMAMBA_PDL", "1") in ("", "0") or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


if triton is not None:

    @triton.jit
    def _norm_gemv_kernel(
        x_ptr, norm_w_ptr, w_ptr, out_ptr, conv_ptr, bc_new_ptr, N, eps,
        stride_x, stride_w, stride_out, stride_conv, stride_bc,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, ROWS_P2: tl.constexpr,
        PDL: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_DTYPE: tl.constexpr, BC: tl.constexpr, D_INNER: tl.constexpr, KW: tl.constexpr,
        STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """y[b, n] = rstd(x[b]) · Σ_k W[n, k] · x[b, k] · norm_w[k]  (== W @ (rmsnorm(x[b]) · norm_w)) for the
        ROWS batch rows, each weight tile read once for all of them; stored in `out` — or, with ACCUMULATE, rounded
        to OUT_DTYPE and added to `out` (the residual). With BC > 0, program 0 also shifts this step's B/C inputs
        (`bc_new`, written by the conv/SSM kernel) into the conv state."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        bb = tl.arange(0, ROWS_P2)
        b_ok = bb < ROWS
        w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)  # weights: before the wait
        if PDL:
            gdc_launch_dependents()
            gdc_wait()  # x is written by the previous kernel
        if (ROWS == 1) & (STAGES > 1):  # the first tile from registers, the rest pipelined through shared memory
            # (tl.range's num_stages: STAGES - 1 tiles in flight as cp.async copies, which cost no registers)
            xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            nw = tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            sumsq = xk * xk
            acc = w.to(tl.float32) * (xk * nw)[None, :]
            for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
                k = k0 + cols
                k_ok = k < K
                w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                nw = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                sumsq += xk * xk
                acc += w.to(tl.float32) * (xk * nw)[None, :]
            y = (tl.sum(acc, axis=1) * (1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)))[None, :]
        elif ROWS == 1:  # the accumulator stays [BLOCK_N, BLOCK_K] and is reduced once, after the loop
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                k_ok = k < K
                xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                nw = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                sumsq += xk * xk
                nxt = k + BLOCK_K  # register double buffering: the next tile is in flight while this one is used
                w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=row_ok[:, None] & (nxt < K)[None, :], other=0.0)
                acc += w.to(tl.float32) * (xk * nw)[None, :]
                w = w_next
            y = (tl.sum(acc, axis=1) * (1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)))[None, :]
        else:  # per-row accumulators [ROWS, BLOCK_N], updated row by row from the tile in registers
            acc = tl.zeros([ROWS_P2, BLOCK_N], dtype=tl.float32)
            sumsq = tl.zeros([ROWS_P2], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                k_ok = k < K
                nw = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                nxt = k + BLOCK_K
                w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=row_ok[:, None] & (nxt < K)[None, :], other=0.0)
                wf = w.to(tl.float32)
                for r in tl.static_range(ROWS):
                    xk = tl.load(x_ptr + r * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
                    part = tl.sum(wf * (xk * nw)[None, :], axis=1)
                    acc = tl.where((bb == r)[:, None], acc + part[None, :], acc)
                    sumsq = tl.where(bb == r, sumsq + tl.sum(xk * xk, axis=0), sumsq)
                w = w_next
            y = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
        _store_rows(y, out_ptr, rows, row_ok, bb, b_ok, stride_out, ACCUMULATE, OUT_DTYPE)
        if BC > 0:
            if pid == 0:
                _shift_bc_into_conv_state(conv_ptr, bc_new_ptr, stride_conv, stride_bc, ROWS, BC, D_INNER, KW)

    @triton.jit
    def _norm_gemm_tc_kernel(
        x_ptr, norm_w_ptr, w_ptr, out_ptr, conv_ptr, bc_new_ptr, sumsq_ptr, part_ptr, count_ptr, N, eps,
        stride_x, stride_w, stride_out, stride_conv, stride_bc, stride_sumsq,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, ROWS_P2: tl.constexpr,
        PDL: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_DTYPE: tl.constexpr, BC: tl.constexpr, D_INNER: tl.constexpr, KW: tl.constexpr,
        NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, SUMSQ_PARTS: tl.constexpr,
    ):  # fmt: skip
        """The same as `_norm_gemv_kernel` for batches of 4 or more, on tensor cores: acc[n, b] += W[n, k] ·
        u[b, k] per [BLOCK_N, BLOCK_K] weight tile, rows padded to ROWS_P2 ≥ 16 (the dot's smallest width), weight
        tiles software-pipelined through shared memory (NUM_STAGES). The operand u = bf16(x · rstd · norm_w) is
        rounded exactly as the PyTorch step rounds it (it normalises, then casts), so rstd comes first: from a pass
        over the x rows (K·ROWS floats per program, from L2), or, with SUMSQ_PARTS > 0, as the sum of that many
        per-row partial sums of squares its producer wrote (the conv + SSM kernel, for out_proj), added in a fixed
        order. (Scaling by rstd after the dot, as the GEMV does, rounds bf16(x · norm_w) instead: as accurate, but
        further from the PyTorch step's rounding — greedy tokens of the demo's model then differed.) float32 runs
        exact ("ieee", off tensor cores) for the CPU interpreter tests.

        Split-K (SPLIT > 1, grid axis 1): with few weight rows (out_proj: 2048) there are too few row blocks to keep
        every SM streaming, so SPLIT programs share a row block, each over K / SPLIT columns, and store their partial
        dot products; the last to arrive (an acq_rel counter per row block, which it resets) adds the SPLIT partials
        in split order — deterministic, whatever the arrival order — and finishes the block."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        bb = tl.arange(0, ROWS_P2)
        b_ok = bb < ROWS
        if PDL:
            gdc_launch_dependents()
            gdc_wait()  # x is written by the previous kernel (the pipelined loop loads weights and x together)
        if SUMSQ_PARTS > 0:
            q = tl.arange(0, triton.next_power_of_2(SUMSQ_PARTS))
            parts = tl.load(sumsq_ptr + bb[:, None] * stride_sumsq + q[None, :],
                            mask=b_ok[:, None] & (q < SUMSQ_PARTS)[None, :], other=0.0)  # fmt: skip
            sumsq = tl.sum(parts, axis=1)
        else:
            sumsq = tl.zeros([ROWS_P2], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + bb[:, None] * stride_x + (k0 + cols)[None, :], mask=b_ok[:, None], other=0.0)
                sumsq += tl.sum(xk.to(tl.float32) * xk.to(tl.float32), axis=1)
        rstd = 1.0 / tl.sqrt(sumsq / K + eps)
        acc = tl.zeros([BLOCK_N, ROWS_P2], dtype=tl.float32)
        for k0 in tl.range(0, K // SPLIT, BLOCK_K, num_stages=NUM_STAGES):
            k = split * (K // SPLIT) + k0 + cols
            w = tl.load(w_ptr + rows[:, None] * stride_w + k[None, :], mask=row_ok[:, None], other=0.0)
            xk = tl.load(x_ptr + bb[:, None] * stride_x + k[None, :], mask=b_ok[:, None], other=0.0).to(tl.float32)
            nw = tl.load(norm_w_ptr + k).to(tl.float32)
            u = ((xk * rstd[:, None]) * nw[None, :]).to(w.dtype)
            acc = tl.dot(w, tl.trans(u), acc, input_precision=PRECISION)
        y = tl.trans(acc)  # [ROWS_P2, BLOCK_N]
        finish = True
        if SPLIT > 1:
            n_local = tl.arange(0, BLOCK_N)
            tl.store(part_ptr + ((pid * SPLIT + split) * ROWS_P2 + bb[:, None]) * BLOCK_N + n_local[None, :], y)
            finish = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == SPLIT - 1  # orders the store above
            if finish:
                y = tl.zeros([ROWS_P2, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLIT):  # fixed order: the result does not depend on who came last
                    y += tl.load(part_ptr + ((pid * SPLIT + s) * ROWS_P2 + bb[:, None]) * BLOCK_N + n_local[None, :],
                                 cache_modifier=".cg")  # fmt: skip
                tl.store(count_ptr + pid, 0)  # ready for the next launch (ordered before this kernel completes)
        if finish:
            _store_rows(y, out_ptr, rows, row_ok, bb, b_ok, stride_out, ACCUMULATE, OUT_DTYPE)
        if BC > 0:
            if (pid == 0) & (split == 0):
                _shift_bc_into_conv_state(conv_ptr, bc_new_ptr, stride_conv, stride_bc, ROWS, BC, D_INNER, KW)

    @triton.jit
    def _embed_kernel(ids_ptr, positions_ptr, table_ptr, pos_table_ptr, out_ptr, id_offset, stride_table, stride_pos,
                      stride_out, H: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """out[b] = float(table[ids[b] - id_offset] + pos_table[positions[b]]), the sum rounded to the tables' dtype
        as the PyTorch step's add rounds it: a step's input in one launch (the lookups, add and cast of
        `OmniMambaGraphDecoder._embed` took ~6 kernels and 30 µs per step on an H100)."""
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        if PDL:
            gdc_launch_dependents()
            gdc_wait()  # the previous step's head kernel still reads `out`
        row = tl.load(ids_ptr + b) - id_offset
        position = tl.load(positions_ptr + b)
        e = tl.load(table_ptr + row * stride_table + cols, mask=ok).to(tl.float32)
        e += tl.load(pos_table_ptr + position * stride_pos + cols, mask=ok).to(tl.float32)
        tl.store(out_ptr + b * stride_out + cols, e.to(table_ptr.dtype.element_ty).to(tl.float32), mask=ok)

    @triton.jit
    def _store_rows(y, out_ptr, rows, row_ok, bb, b_ok, stride_out, ACCUMULATE: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """out[b, rows] = y — or, with ACCUMULATE (out_proj), y rounded to the model dtype and added to the float32
        residual in `out`."""
        out_ptrs = out_ptr + bb[:, None] * stride_out + rows[None, :]
        ok = b_ok[:, None] & row_ok[None, :]
        if ACCUMULATE:
            y = y.to(OUT_DTYPE).to(tl.float32) + tl.load(out_ptrs, mask=ok, other=0.0)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _shift_bc_into_conv_state(conv_ptr, bc_new_ptr, stride_conv, stride_bc, ROWS: tl.constexpr, BC: tl.constexpr,
                                  D_INNER: tl.constexpr, KW: tl.constexpr):  # fmt: skip
        """Shift this step's B/C conv inputs (`bc_new`, written by the conv/SSM kernel) into the conv state."""
        c = tl.arange(0, BC)
        j = tl.arange(0, KW)
        for r in tl.static_range(ROWS):
            conv = conv_ptr + r * stride_conv + (D_INNER + c)[:, None] * KW
            old = tl.load(conv + tl.minimum(j + 1, KW - 1)[None, :])
            new = tl.load(bc_new_ptr + r * stride_bc + c)
            tl.store(conv + j[None, :], tl.where(j[None, :] == KW - 1, new[:, None], old))

    @triton.jit
    def _up_rows(up_ptr, rows, R: tl.constexpr):
        """Rows of the task adapter's `up` weight [rows, R] (float32)."""
        return tl.load(up_ptr + rows[:, None] * R + tl.arange(0, R)[None, :]).to(tl.float32)

    @triton.jit
    def _adapted(proj_ptr, rows, up, a, scaling):
        """One slice of `in_proj(x) + scaling · up(down(x))` (the GEMV part already in `proj`), rounded to the model
        dtype as the unfused path rounds it."""
        base = tl.load(proj_ptr + rows).to(tl.float32)
        return (base + scaling * tl.sum(up * a[None, :], axis=1)).to(proj_ptr.dtype.element_ty)

    @triton.jit
    def _conv_window(conv_ptr, ch, KW: tl.constexpr):
        """old[c, j] = conv_state[c, j + 1] for j < KW - 1 (the last column is replaced by the new input)."""
        j = tl.arange(0, KW)
        return tl.load(conv_ptr + ch[:, None] * KW + tl.minimum(j + 1, KW - 1)[None, :])

    @triton.jit
    def _conv_step(old, new, w, bias, KW: tl.constexpr):
        """Depthwise causal conv over [last KW-1 inputs ‖ new] + bias, then SiLU, rounded to the model dtype; returns
        (output, the new conv-state tile)."""
        j = tl.arange(0, KW)
        shifted = tl.where(j[None, :] == KW - 1, new[:, None], old)
        out = tl.sum(shifted.to(tl.float32) * w, axis=1) + bias
        out = out / (1.0 + tl.exp(-out))
        return out.to(new.dtype).to(tl.float32), shifted

    @triton.jit
    def _conv_ssm_step_kernel(
        proj_ptr, up_ptr, conv_ptr, conv_w_ptr, conv_b_ptr, dt_bias_ptr, A_ptr, D_ptr, ssm_ptr,
        gated_ptr, bc_new_ptr, gated_sumsq_ptr,
        scaling, adapter_offset, dt_lo, dt_hi,
        stride_proj, stride_conv, stride_ssm, stride_gated, stride_bc, stride_gated_sumsq,
        D_INNER: tl.constexpr, HEADS: tl.constexpr, GROUPS: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
        N: tl.constexpr, R: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        pb = tl.program_id(1)
        b = tl.program_id(2)
        g = h // (HEADS // GROUPS)
        proj = proj_ptr + b * stride_proj
        conv = conv_ptr + b * stride_conv
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, N)
        j = tl.arange(0, KW)
        # in_proj layout: [z (D_INNER) ‖ x (D_INNER) ‖ B (GROUPS·N) ‖ C (GROUPS·N) ‖ dt (HEADS)]; conv channels = x ‖ B ‖ C
        z_rows, x_rows = h * P + p, D_INNER + h * P + p
        b_rows, c_rows = 2 * D_INNER + g * N + n, 2 * D_INNER + GROUPS * N + g * N + n
        dt_rows = 2 * D_INNER + 2 * GROUPS * N + h + tl.arange(0, 1)
        x_ch, b_ch, c_ch = h * P + p, D_INNER + g * N + n, D_INNER + GROUPS * N + g * N + n

        # Phase 1, before the wait: everything the previous kernel does not write — weights, and the recurrent states
        # (last written by this layer in the previous step, which finished before this step's first kernel).
        up_z, up_x = _up_rows(up_ptr, z_rows, R), _up_rows(up_ptr, x_rows, R)
        up_b, up_c, up_dt = _up_rows(up_ptr, b_rows, R), _up_rows(up_ptr, c_rows, R), _up_rows(up_ptr, dt_rows, R)
        w_x = tl.load(conv_w_ptr + x_ch[:, None] * KW + j[None, :]).to(tl.float32)
        w_b = tl.load(conv_w_ptr + b_ch[:, None] * KW + j[None, :]).to(tl.float32)
        w_c = tl.load(conv_w_ptr + c_ch[:, None] * KW + j[None, :]).to(tl.float32)
        if HAS_BIAS:
            bias_x = tl.load(conv_b_ptr + x_ch).to(tl.float32)
            bias_b = tl.load(conv_b_ptr + b_ch).to(tl.float32)
            bias_c = tl.load(conv_b_ptr + c_ch).to(tl.float32)
        else:
            bias_x = tl.zeros([BLOCK_P], dtype=tl.float32)
            bias_b = tl.zeros([N], dtype=tl.float32)
            bias_c = tl.zeros([N], dtype=tl.float32)
        old_x, old_b, old_c = _conv_window(conv, x_ch, KW), _conv_window(conv, b_ch, KW), _conv_window(conv, c_ch, KW)
        dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
        A = tl.load(A_ptr + h).to(tl.float32)
        D = tl.load(D_ptr + h).to(tl.float32)
        state_ptrs = ssm_ptr + b * stride_ssm + (h * P + p)[:, None] * N + n[None, :]
        state = tl.load(state_ptrs).to(tl.float32)  # kept in float32 or the model dtype (config.ssm_state_dtype)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()  # `proj` is written by the in_proj kernel

        # Phase 2: adapter `up` on this program's slices of the projection, conv step, SSM step, gate.
        a = tl.load(proj + adapter_offset + tl.arange(0, R)).to(tl.float32)  # this task's down(x)
        z = _adapted(proj, z_rows, up_z, a, scaling).to(tl.float32)
        x_in = _adapted(proj, x_rows, up_x, a, scaling)
        b_in = _adapted(proj, b_rows, up_b, a, scaling)
        c_in = _adapted(proj, c_rows, up_c, a, scaling)
        dt = tl.sum(_adapted(proj, dt_rows, up_dt, a, scaling).to(tl.float32), axis=0)
        x, x_window = _conv_step(old_x, x_in, w_x, bias_x, KW)
        Bv, _ = _conv_step(old_b, b_in, w_b, bias_b, KW)
        Cv, _ = _conv_step(old_c, c_in, w_c, bias_c, KW)
        tl.store(conv + x_ch[:, None] * KW + j[None, :], x_window)  # this head's own channels: no sharing
        if (h % (HEADS // GROUPS) == 0) & (pb == 0):  # the group's B/C inputs: shifted in by the out_proj kernel
            tl.store(bc_new_ptr + b * stride_bc + g * N + n, b_in)
            tl.store(bc_new_ptr + b * stride_bc + GROUPS * N + g * N + n, c_in)

        # SSM recurrence (selective_state_update with dt_softplus): h ← h·exp(Δ·A) + Δ·x·Bᵀ;  y = h·C + D·x
        delta = dt + dt_bias
        delta = tl.where(delta <= 20.0, tl.log(1.0 + tl.exp(delta)), delta)
        if HAS_LIMIT:
            delta = tl.minimum(tl.maximum(delta, dt_lo), dt_hi)
        state = state * tl.exp(delta * A) + (delta * x)[:, None] * Bv[None, :]
        tl.store(state_ptrs, state.to(ssm_ptr.dtype.element_ty))  # y below reads the unrounded float32 update
        y = tl.sum(state * Cv[None, :], axis=1) + D * x
        y = y.to(proj_ptr.dtype.element_ty).to(tl.float32)  # the state update's output is in the model dtype
        gated = y * (z / (1.0 + tl.exp(-z)))  # gate before the norm (norm_before_gate=False, §3.4 step 6)
        tl.store(gated_ptr + b * stride_gated + h * P + p, gated)
        # this program's share of the gated row's sum of squares, for the tensor-core out_proj (SUMSQ_PARTS)
        tl.store(gated_sumsq_ptr + b * stride_gated_sumsq + h * tl.num_programs(1) + pb, tl.sum(gated * gated, axis=0))


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Launch configurations, tuned on an H100 for the 1.3B shapes (benchmarks/profile_decode_step.py --sweep; the
# times are per GEMV inside a CUDA graph over > L2-sized weight copies).
LAUNCH = {
    # in_proj (+ adapter down), 8528 x 2048: whole rows per program, so every weight load is issued before the wait
    # (12.8 µs alone, 2.72 TB/s = 90% of copy). `one_row`: what batch 1 uses instead — half rows, 4 warps, the first
    # half loaded before the wait, the second through shared memory (`stages`: cp.async, no registers held). Inside
    # whole steps (bf16 state, medians of 4 interleaved passes, docs/benchmarks/2026-11-25-h100-session9/
    # interleaved_sweep_*.log): T2I 1.185 -> 1.125 ms per step, MMU 1.235 -> 1.168; at batches 2 and 3 it loses
    # (T2I 1.53 -> 1.71, 1.94 -> 2.17 ms), so they keep whole rows
    "in_proj": dict(block_n=4, block_k=2048, num_warps=8, one_row=dict(block_k=1024, num_warps=4, stages=2)),
    "head": dict(block_n=2, block_k=2048, num_warps=4),  # 16384 (or 50288) x 2048: 23.1 µs, 2.90 TB/s (96%)
    "out_proj": dict(block_n=8, block_k=1024, num_warps=8),  # 2048 x 4096: 7.0 µs, 2.41 TB/s (80%)
    # head_dim rows per program of the conv + SSM kernel: a whole head (the 1.3B's 64). Each program also recomputes
    # its group's B / C inputs, so smaller blocks repeat that work: T2I ms/step with 16 vs 64, bf16 state, b1 1.195
    # vs 1.187, b16 2.52 vs 2.36, b64 (hybrid) 5.62 vs 4.92 (docs/benchmarks/2026-11-24-h100-session7/block_p_sweep_*)
    "ssm_block_p": 64,
    "ssm_num_warps": 4,
}


# The same three GEMVs for batches of TENSOR_CORE_MIN_BATCH rows or more, in bfloat16: `_norm_gemm_tc_kernel`.
# Tuned at 16 rows on an H100 (benchmarks/profile_decode_step.py --tensor-core-sweep; per GEMV in a CUDA graph over
# > L2-sized weight copies). out_proj has only 2048 rows: split-K keeps every SM streaming (no split: 23.7 µs).
LAUNCH_TENSOR_CORES = {
    "in_proj": dict(block_n=128, block_k=128, num_warps=8, num_stages=4, split_k=1),  # 15.1 µs, 77% of copy
    "head": dict(block_n=128, block_k=128, num_warps=8, num_stages=3, split_k=1),  # 16384 x 2048: 25.3 µs, 88%
    "out_proj": dict(block_n=128, block_k=128, num_warps=8, num_stages=3, split_k=8),  # 11.9 µs, 47%
}
TENSOR_CORE_MIN_BATCH = 4
TENSOR_CORE_DTYPES = (torch.bfloat16,)  # float32 works too (exact, off tensor cores): the CPU interpreter tests use it


@functools.cache
def tensor_cores_available(device: torch.device) -> bool:
    """bf16 tensor-core dots: CUDA from compute capability 8.0 (Ampere), or the CPU interpreter (tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return fused_decode_available(device.type)


@functools.cache
def _shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory a tensor-core GEMM's pipeline stages may take on `device` (the opt-in per-block maximum
    less 24 KB for the rest: 227 KB on an H100, 163 KB on an A100, ~99 KB on consumer cards)."""
    if device.type != "cuda":
        return 200 << 10
    index = device.index if device.index is not None else torch.cuda.current_device()
    optin = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]  # what launches check
    return max(32 << 10, optin - (24 << 10))


def launch_configs(batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch configurations for one decode step of `batch` rows in `dtype`: tensor cores from
    TENSOR_CORE_MIN_BATCH rows in bfloat16 where the device has them, the CUDA-core GEMVs otherwise."""
    configs = {k: _for_rows(v, batch) for k, v in LAUNCH.items()}
    if batch >= TENSOR_CORE_MIN_BATCH and dtype in TENSOR_CORE_DTYPES and tensor_cores_available(device):
        configs.update({k: dict(v, tensor_cores=True) for k, v in LAUNCH_TENSOR_CORES.items()})
    return configs


def _for_rows(config, batch: int):
    """A LAUNCH entry for `batch` rows: its `one_row` settings replace the others at batch 1."""
    if not isinstance(config, dict) or "one_row" not in config:
        return config
    base = {k: v for k, v in config.items() if k != "one_row"}
    return {**base, **config["one_row"]} if batch == 1 else base


def rmsnorm_gemv(residual, norm_weight, weight, out, eps, block_n=16, block_k=256, num_warps=4,
                 tensor_cores=False, num_stages=3, split_k=1, workspace=None, stages=1) -> torch.Tensor:  # fmt: skip
    """out[b] = weight @ rmsnorm(residual[b]) · norm_weight (float32 accumulation, written in out's dtype).
    `num_stages`: the tensor-core GEMM's pipeline depth; `stages`: the CUDA-core GEMV's at batch 1 (> 1: the weight
    tiles after the first through shared memory; 1: register double buffering)."""
    _launch_norm_gemv(
        residual, norm_weight, weight, out, residual, residual, eps, 0, 0, ACCUMULATE=False, OUT_DTYPE=tl.float32,
        BC=0, D_INNER=0, KW=1, block_n=block_n, block_k=block_k, num_warps=num_warps, tensor_cores=tensor_cores,
        num_stages=num_stages, split_k=split_k, workspace=workspace, stages=stages,
    )  # fmt: skip
    return out


def gemv_stages(stages: int, batch: int, block_k: int, k: int) -> int:
    """The `_norm_gemv_kernel` STAGES a launch gets: `stages` at batch 1 when a row spans more than one tile (the
    pipelined loop then has tiles to load), else 1 (register double buffering)."""
    return stages if batch == 1 and block_k < k else 1


def _launch_norm_gemv(x, norm_weight, weight, out, conv_state, bc_new, eps, stride_conv, stride_bc, *, block_n,
                      block_k, num_warps, tensor_cores, num_stages, split_k, workspace, sumsq_parts=None, stages=1,
                      **constants):  # fmt: skip
    batch, k = x.shape
    n = weight.shape[0]
    args = (x.stride(0), weight.stride(0), out.stride(0), stride_conv, stride_bc)
    if tensor_cores and k & -k >= 16:  # the dot needs K tiles of >= 16 that divide K
        if weight.dtype == torch.float16:
            raise ValueError("the tensor-core decode GEMV takes bfloat16 (or float32) weights, not float16")
        if k % (16 * split_k):  # each split must hold whole tiles of >= 16 columns
            split_k = 1
        rows_p2 = max(16, triton.next_power_of_2(batch))
        block_k = min(block_k, (k // split_k) & -(k // split_k))  # a power of two dividing each split: no K mask
        stage_bytes = block_k * (block_n * weight.element_size() + rows_p2 * x.element_size())
        num_stages = max(1, min(num_stages, _shared_memory_budget(x.device) // stage_bytes))
        blocks = triton.cdiv(n, block_n)
        if split_k > 1:
            parts, counts = (workspace or SplitKWorkspace(x.device)).get(blocks, split_k, rows_p2, block_n)
        else:  # no scratch: the kernel's SPLIT == 1 branch touches neither pointer
            parts = counts = out
        sumsq = x if sumsq_parts is None else sumsq_parts
        _norm_gemm_tc_kernel[(blocks, split_k)](
            x, norm_weight, weight, out, conv_state, bc_new, sumsq, parts, counts, n, eps, *args, sumsq.stride(0),
            K=k, BLOCK_N=block_n, BLOCK_K=block_k, ROWS=batch, ROWS_P2=rows_p2, NUM_STAGES=num_stages,
            PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", SPLIT=split_k,
            SUMSQ_PARTS=0 if sumsq_parts is None else sumsq_parts.shape[1], **constants, **_pdl(out.device),
            num_warps=num_warps,
        )  # fmt: skip
    else:
        _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
            x, norm_weight, weight, out, conv_state, bc_new, n, eps, *args, K=k, BLOCK_N=block_n, BLOCK_K=block_k,
            ROWS=batch, ROWS_P2=triton.next_power_of_2(batch), STAGES=gemv_stages(stages, batch, block_k, k),
            **constants, **_pdl(out.device), num_warps=num_warps,
        )  # fmt: skip


class SplitKWorkspace:
    """Scratch for the split-K tensor-core GEMVs: partial dot products and per-row-block arrival counters (zero
    between launches: the last program of each block resets its counter). A decode step's GEMVs run one after another
    (each waits for the previous kernel before touching the scratch), so one workspace serves them all. It only grows,
    and only outside CUDA-graph capture (the warm-up steps run first); the owner keeps it alive with its graphs."""

    def __init__(self, device):
        self.device = device
        self.parts = self.counts = None

    def get(self, blocks, split, rows_p2, block_n):
        need = (blocks * split * rows_p2 * block_n, blocks)
        have = (0, 0) if self.parts is None else (self.parts.numel(), self.counts.numel())
        if need[0] > have[0] or need[1] > have[1]:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("SplitKWorkspace must grow before CUDA-graph capture (run the step once first)")
            self.parts = torch.empty(max(need[0], have[0]), device=self.device, dtype=torch.float32)
            self.counts = torch.zeros(max(need[1], have[1]), device=self.device, dtype=torch.int32)
        return self.parts, self.counts


def embed_rows(ids, positions, table, pos_table, out, id_offset=0, block=1024):
    """out[b] = float(table[ids[b] - id_offset] + pos_table[positions[b]]) (the sum rounded to the tables' dtype)."""
    assert table.dtype == pos_table.dtype and out.dtype == torch.float32, (table.dtype, pos_table.dtype, out.dtype)
    hidden = table.shape[1]
    _embed_kernel[(ids.shape[0], triton.cdiv(hidden, block))](
        ids, positions, table, pos_table, out, int(id_offset), table.stride(0), pos_table.stride(0), out.stride(0),
        H=hidden, BLOCK=block, **_pdl(out.device), num_warps=4,
    )  # fmt: skip
    return out


def gated_sumsq_parts(heads: int, head_dim: int, block_p: int) -> int:
    """How many partial sums of squares of each gated row `conv_ssm_step` writes (one per program of a row)."""
    return heads * triton.cdiv(head_dim, min(block_p, head_dim))


def conv_ssm_step(proj, up_weight, scaling, adapter_offset, conv_state, conv_weight, conv_bias, dt_bias, A, D,
                  ssm_state, gated, bc_new, gated_sumsq, *, d_inner, heads, groups, head_dim, d_state, time_step_limit,
                  block_p=32):  # fmt: skip
    """The per-head middle of a block (adapter `up`, conv step, SSM step, gate); see the module docstring. Also
    writes `gated_sumsq` [batch, gated_sumsq_parts(...)]: partial sums of squares of each gated row."""
    batch = proj.shape[0]
    block_p = min(block_p, head_dim)
    lo, hi = time_step_limit
    grid = (heads, triton.cdiv(head_dim, block_p), batch)
    assert gated_sumsq.shape == (batch, heads * grid[1]), gated_sumsq.shape
    _conv_ssm_step_kernel[grid](
        proj, up_weight, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, dt_bias, A, D,
        ssm_state, gated, bc_new, gated_sumsq, float(scaling), int(adapter_offset), float(lo), float(hi),
        proj.stride(0), conv_state.stride(0), ssm_state.stride(0), gated.stride(0), bc_new.stride(0),
        gated_sumsq.stride(0),
        D_INNER=d_inner, HEADS=heads, GROUPS=groups, P=head_dim, BLOCK_P=block_p, N=d_state,
        R=up_weight.shape[1], KW=conv_state.shape[-1], HAS_BIAS=conv_bias is not None,
        HAS_LIMIT=(lo, hi) != (0.0, float("inf")), **_pdl(proj.device), num_warps=LAUNCH["ssm_num_warps"],
    )  # fmt: skip


def gated_norm_gemv(gated, norm_weight, weight, residual, conv_state, bc_new, eps, *, d_inner, out_dtype,
                    block_n=8, block_k=512, num_warps=4, tensor_cores=False, num_stages=3, split_k=1,
                    workspace=None, gated_sumsq=None, stages=1):  # fmt: skip
    """residual[b] += weight @ gated_rmsnorm(gated[b]) (rounded to out_dtype first); finishes the conv-state shift.
    `gated_sumsq`: the partial sums of squares `conv_ssm_step` wrote (the tensor-core path then reads no full rows
    for rstd)."""
    _launch_norm_gemv(
        gated, norm_weight, weight, residual, conv_state, bc_new, eps, conv_state.stride(0), bc_new.stride(0),
        ACCUMULATE=True, OUT_DTYPE=getattr(tl, _TL_DTYPES[out_dtype]), BC=bc_new.shape[1], D_INNER=d_inner,
        KW=conv_state.shape[-1], block_n=block_n, block_k=block_k, num_warps=num_warps, tensor_cores=tensor_cores,
        num_stages=num_stages, split_k=split_k, workspace=workspace, sumsq_parts=gated_sumsq, stages=stages,
    )  # fmt: skip


def _pdl(device) -> dict:
    """Kernel arguments for programmatic dependent launch: the PDL constexpr, and launch_pdl where it is on."""
    return dict(PDL=True, launch_pdl=True) if use_pdl(device) else dict(PDL=False)


__all__ = [
    "LAUNCH", "LAUNCH_TENSOR_CORES", "SplitKWorkspace", "TENSOR_CORE_MIN_BATCH", "conv_ssm_step", "embed_rows",
    "fused_decode_available", "gated_norm_gemv", "gated_sumsq_parts", "launch_configs", "rmsnorm_gemv",
    "tensor_cores_available", "use_pdl",
]
