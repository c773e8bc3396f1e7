"""One Triton launch per decode step for choosing the next token inside a captured graph (`OmniMambaGraphDecoder.decode`).

Without it, the choice is a chain of small PyTorch kernels after each step: the float cast, argmax, the eos update,
the writes of the choice, the fed-back id and position (~20 µs per token on an H100), and for sampling
transformers' warpers + `torch.multinomial`, ~150 µs per token at the T2I head's 16,384 logits, mostly `torch.topk`
(110 µs) and `torch.multinomial` (32 µs) (docs/BENCHMARKS.md, `benchmarks/profile_sampling.py`). Here one program per
row does all of it:

* greedy: the first index of the row's maximum (as `torch.argmax`), over blocks of the row;
* sampling with a temperature and optionally top-k: scores `logits / temperature` (as `TemperatureLogitsWarper`), the
  top-k threshold as the k-th largest score found by bisection over the scores' bits (exact: `TopKLogitsWarper`
  keeps every score >= the k-th largest), then a Gumbel-max draw, `argmax(score + Gumbel noise)` over the kept
  scores, which samples from `softmax` of the kept scores. The noise comes from Triton's Philox generator, seeded
  per `decode()` call from torch's CUDA generator and per step: seeded calls repeat, but draw other numbers than
  `torch.multinomial` in the host loop / GenerationMixin, so the two sample the same distribution, not the same
  tokens (tests check the distribution). With top-k the whole row sits in registers up to `TOP_K_MAX_WIDTH`
  (16,384: T2I). Wider heads (MMU, 50,288) take three launches over blocks of the row instead (`_wide_top_k`,
  k <= `WIDE_TOP_K_MAX`): 26.7 µs for top-50 against 133 µs for the PyTorch choice on an H100 (a one-program version
  that streamed the row five times took 181 µs: docs/attempts/wide_top_k_radix_select.diff). Top-p keeps the
  PyTorch choice;
* eos and padding (a finished row gets `pad`), the choice written at the row's step counter, fed back as
  `choice + offset` to every row group (classifier-free guidance feeds two), positions advanced.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional (CPU installs)
    triton = None

TOP_K_MAX_WIDTH = 16384
GREEDY_BLOCK = 4096
WIDE_TOP_K_MAX = 1024  # top-k at wider heads: candidates (blocks x k) must fit one program's registers

if triton is not None:

    @triton.jit
    def _order_key(x):
        """int32 keys whose signed order is the order of the float32 values `x` (no NaNs)."""
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _kth_largest(s, ok, top_k):
        """The k-th largest of the scores `s` where `ok` (-inf if fewer than k are), by bisection over their order
        keys: every score >= it is what `TopKLogitsWarper` keeps."""
        key = _order_key(s).to(tl.int64)
        lo = tl.min(tl.full(s.shape, -2147483648, tl.int64), axis=0)  # count(key >= lo) = count(ok)
        hi = lo + 4294967296  # count(key >= hi) = 0 < top_k
        for _ in range(32):  # the largest t with count(key >= t) >= top_k: the k-th largest key
            mid = (lo + hi) >> 1
            take = tl.sum((ok & (key >= mid)).to(tl.int32), axis=0) >= top_k
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        return tl.max(tl.where(ok & (key <= lo), s, float("-inf")), axis=0)  # the score whose key is lo

    @triton.jit
    def _choose_kernel(
        logits_ptr, stride_logits, tokens_ptr, stride_tokens, k_ptr, ids_ptr, positions_ptr, unfinished_ptr, eos_ptr,
        seed_ptr, temperature, top_k, offset, pad, R, V: tl.constexpr,
        GROUPS: tl.constexpr, N_EOS: tl.constexpr, SAMPLE: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        row = logits_ptr + b * stride_logits
        cols = tl.arange(0, BLOCK)
        step = tl.load(k_ptr + b)
        seed = tl.load(seed_ptr) + step  # one Philox stream per step (and call); offsets tell rows and logits apart
        if TOP_K:  # the whole row in one block (BLOCK >= V)
            ok = cols < V
            s = tl.load(row + cols, mask=ok, other=float("-inf")).to(tl.float32) / temperature
            threshold = _kth_largest(s, ok, top_k)
            noisy = s - tl.log(-tl.log(tl.rand(seed, b * V + cols)))
            noisy = tl.where(ok & (s >= threshold), noisy, float("-inf"))
            choice = tl.argmax(noisy, axis=0)
        else:  # greedy, or sampling from the whole row: a running (max, first index) over blocks
            best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
            choice = tl.argmax(tl.zeros([BLOCK], tl.float32), axis=0)  # 0, as torch.argmax of an all -inf row
            for v0 in range(0, V, BLOCK):
                idx = v0 + cols
                ok = idx < V
                x = tl.load(row + idx, mask=ok, other=float("-inf")).to(tl.float32)
                if SAMPLE:
                    x = tl.where(ok, x / temperature - tl.log(-tl.log(tl.rand(seed, b * V + idx))), float("-inf"))
                m = tl.max(x, axis=0)
                better = m > best  # strictly: ties keep the earlier block, as torch.argmax keeps the first index
                choice = tl.where(better, tl.argmax(x, axis=0) + v0, choice)
                best = tl.where(better, m, best)
        _record_and_feed(choice, b, step, tokens_ptr, stride_tokens, k_ptr, ids_ptr, positions_ptr, unfinished_ptr,
                         eos_ptr, offset, pad, R, GROUPS, N_EOS)  # fmt: skip

    @triton.jit
    def _record_and_feed(choice, b, step, tokens_ptr, stride_tokens, k_ptr, ids_ptr, positions_ptr, unfinished_ptr,
                         eos_ptr, offset, pad, R, GROUPS: tl.constexpr, N_EOS: tl.constexpr):  # fmt: skip
        """Row b's choice: `pad` once finished (eos updates `unfinished`), written at its step, fed back to every
        row group as `choice + offset` at the next position."""
        choice = choice.to(tl.int64)
        if N_EOS > 0:
            live = tl.load(unfinished_ptr + b)
            choice = tl.where(live, choice, pad)
            e = tl.arange(0, N_EOS)
            hit = tl.sum((tl.load(eos_ptr + e) == choice).to(tl.int32), axis=0) > 0
            tl.store(unfinished_ptr + b, live & (hit == 0))
        tl.store(tokens_ptr + b * stride_tokens + step, choice)
        tl.store(k_ptr + b, step + 1)
        for g in tl.static_range(GROUPS):
            tl.store(ids_ptr + g * R + b, choice + offset)
            tl.store(positions_ptr + g * R + b, tl.load(positions_ptr + g * R + b) + 1)

    # Top-k over a head too wide for one program's registers (MMU, 50,288): three launches over blocks of the row.
    # 1. each block's k largest scores (a multiset: the scores above the block's k-th largest, then copies of it);
    # 2. the row's k-th largest is the k-th largest of those candidates (nblocks · KP of them: every block program
    #    finds it again, cheaper than a launch), then each block's Gumbel-max over its scores >= it;
    # 3. per row, the first maximum over the blocks, recorded and fed back as above.

    @triton.jit
    def _block_top_k_kernel(logits_ptr, stride_logits, cand_ptr, temperature, top_k, V: tl.constexpr,
                            BLOCK: tl.constexpr, KP: tl.constexpr):  # fmt: skip
        b, blk = tl.program_id(0), tl.program_id(1)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        ok = idx < V
        s = tl.load(logits_ptr + b * stride_logits + idx, mask=ok, other=float("-inf")).to(tl.float32) / temperature
        t = _kth_largest(s, ok, top_k)
        above = ok & (s > t)
        out = cand_ptr + (b * tl.num_programs(1) + blk) * KP
        tl.store(out + tl.cumsum(above.to(tl.int32), axis=0) - 1, s, mask=above)  # compacted, in order
        j = tl.arange(0, KP)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        tl.store(out + j, tl.where(j < top_k, t, float("-inf")), mask=j >= n_above)

    @triton.jit
    def _block_draw_kernel(logits_ptr, stride_logits, cand_ptr, seed_ptr, k_ptr, best_ptr, temperature, top_k,
                           V: tl.constexpr, BLOCK: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr):  # fmt: skip
        b, blk = tl.program_id(0), tl.program_id(1)
        c = tl.arange(0, CP)
        cand = tl.load(cand_ptr + b * CAND + c, mask=c < CAND, other=float("-inf"))
        threshold = _kth_largest(cand, c < CAND, top_k)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        ok = idx < V
        s = tl.load(logits_ptr + b * stride_logits + idx, mask=ok, other=float("-inf")).to(tl.float32) / temperature
        seed = tl.load(seed_ptr) + tl.load(k_ptr + b)  # the whole-row kernel's noise: same seed, same offsets
        noisy = tl.where(ok & (s >= threshold), s - tl.log(-tl.log(tl.rand(seed, b * V + idx))), float("-inf"))
        at = (b * tl.num_programs(1) + blk) * 2
        tl.store(best_ptr + at, tl.max(noisy, axis=0))
        tl.store(best_ptr + at + 1, (tl.argmax(noisy, axis=0) + blk * BLOCK).to(tl.float32))  # exact below 2^24

    @triton.jit
    def _pick_kernel(best_ptr, tokens_ptr, stride_tokens, k_ptr, ids_ptr, positions_ptr, unfinished_ptr, eos_ptr,
                     offset, pad, R, NB: tl.constexpr, NBP: tl.constexpr, GROUPS: tl.constexpr,
                     N_EOS: tl.constexpr):  # fmt: skip
        b = tl.program_id(0)
        blk = tl.arange(0, NBP)
        best = tl.load(best_ptr + (b * NB + blk) * 2, mask=blk < NB, other=float("-inf"))
        first = tl.argmax(best, axis=0)  # ties: the earlier block, as the whole-row kernel keeps the first index
        choice = tl.load(best_ptr + (b * NB + first) * 2 + 1).to(tl.int64)
        _record_and_feed(choice, b, tl.load(k_ptr + b), tokens_ptr, stride_tokens, k_ptr, ids_ptr, positions_ptr,
                         unfinished_ptr, eos_ptr, offset, pad, R, GROUPS, N_EOS)  # fmt: skip


def fused_choice_supported(width: int, do_sample: bool, top_k: int) -> bool:
    """Whether `choose_and_feed` implements this choice for a head of `width` logits."""
    wide_top_k = do_sample and top_k and width > TOP_K_MAX_WIDTH
    return triton is not None and (not wide_top_k or top_k <= WIDE_TOP_K_MAX)


_SCRATCH: dict = {}


def _scratch(name: str, device, rows: int, numel: int) -> torch.Tensor:
    """float32 scratch for the wide top-k launches, kept for the process (CUDA graphs hold its address); it is
    allocated by the warm-up runs before a capture."""
    key = (name, device, rows, numel)
    if key not in _SCRATCH:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the wide top-k scratch must exist before CUDA-graph capture (run the choice once first)")
        _SCRATCH[key] = torch.empty(rows * numel, device=device, dtype=torch.float32)
    return _SCRATCH[key]


def choose_and_feed(logits, tokens, steps, ids, positions, unfinished, seed, eos=None, *, do_sample=False,
                    temperature=1.0, top_k=0, offset=0, pad=0) -> None:  # fmt: skip
    """For each of the R = `tokens.shape[0]` rows: choose from `logits[row]` (greedy, or sampled after temperature
    and top-k), `pad` if the row has finished (`unfinished`, updated when it chooses an id of `eos`: a tensor whose
    length is a power of two, padded with -1; None for no eos), write the choice at `tokens[row, steps[row]]`,
    advance `steps`, feed `choice + offset` to `ids` and advance `positions` for every group of R rows (`ids` holds
    a multiple of R rows). `seed` [1] int64: with `steps`, it seeds the sampling noise."""
    r, width = tokens.shape[0], logits.shape[1]
    top_k = min(top_k or 0, width) if do_sample else 0
    temperature = float(temperature or 1.0)
    if top_k and width > TOP_K_MAX_WIDTH:
        _wide_top_k(logits, tokens, steps, ids, positions, unfinished, seed, eos, temperature, top_k, offset, pad)
        return
    block = triton.next_power_of_2(width) if top_k else min(GREEDY_BLOCK, triton.next_power_of_2(width))
    _choose_kernel[(r,)](
        logits, logits.stride(0), tokens, tokens.stride(0), steps, ids, positions, unfinished,
        seed if eos is None else eos, seed, temperature, top_k, offset, pad, r, width,
        GROUPS=ids.shape[0] // r, N_EOS=0 if eos is None else eos.numel(), SAMPLE=bool(do_sample),
        TOP_K=bool(top_k), BLOCK=block, num_warps=16 if top_k else 8,
    )  # fmt: skip


def _wide_top_k(logits, tokens, steps, ids, positions, unfinished, seed, eos, temperature, top_k, offset, pad):
    """`choose_and_feed`'s top-k sampling for heads wider than TOP_K_MAX_WIDTH: three launches (see the kernels).
    `temperature` is a float already, `top_k` at most the width."""
    if top_k > WIDE_TOP_K_MAX:
        raise ValueError(f"the one-launch top-k takes k <= {WIDE_TOP_K_MAX} at width {logits.shape[1]}, not {top_k}")
    r, width = tokens.shape[0], logits.shape[1]
    block = min(GREEDY_BLOCK, triton.next_power_of_2(width))
    nb, kp = triton.cdiv(width, block), triton.next_power_of_2(top_k)
    cand = _scratch("candidates", logits.device, r, nb * kp)
    best = _scratch("best", logits.device, r, 2 * nb)
    _block_top_k_kernel[(r, nb)](logits, logits.stride(0), cand, temperature, top_k, width, BLOCK=block, KP=kp,
                                 num_warps=8)  # fmt: skip
    _block_draw_kernel[(r, nb)](
        logits, logits.stride(0), cand, seed, steps, best, temperature, top_k, width, BLOCK=block, CAND=nb * kp,
        CP=triton.next_power_of_2(nb * kp), num_warps=16 if nb * kp > 4096 else 8,
    )  # fmt: skip
    _pick_kernel[(r,)](
        best, tokens, tokens.stride(0), steps, ids, positions, unfinished, seed if eos is None else eos, offset, pad,
        r, NB=nb, NBP=triton.next_power_of_2(nb), GROUPS=ids.shape[0] // r, N_EOS=0 if eos is None else eos.numel(),
        num_warps=1,
    )  # fmt: skip


__all__ = ["TOP_K_MAX_WIDTH", "choose_and_feed", "fused_choice_supported"]
