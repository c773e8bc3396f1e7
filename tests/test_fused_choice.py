"""The one-launch token choice of the graph decoder (modeling/triton_choice_omnimamba.py), in Triton's interpreter:
greedy equals torch.argmax (first index on ties, across blocks), eos / padding / feedback equal the PyTorch
choice's, sampling draws from softmax(logits / temperature) restricted to the top k (ties at the threshold kept, as
transformers keeps them), seeded draws repeat and differ between steps, and `decode()` with the fused greedy choice
gives the PyTorch choice's tokens. On CPU the kernel runs in the interpreter (TRITON_INTERPRET=1, set before triton
is imported, hence the subprocess); tests/gpu runs it compiled."""

import json

import pytest
from common import run_in_triton_interpreter

pytest.importorskip("triton")


def test_fused_choice_in_triton_interpreter():
    r = run_in_triton_interpreter(__file__)
    assert r["greedy_checked"] == 4 and r["decode_equal"]
    assert r["outside_top_k"] == 0 and r["threshold_ties_drawn"] > 0
    # heads wider than TOP_K_MAX_WIDTH (MMU): three launches over blocks of the row (here 8-column blocks)
    assert r["wide_outside_top_k"] == 0 and r["wide_threshold_ties_drawn"] > 0
    assert r["wide_close_outside_top_k"] == 0 and r["wide_close_inside_drawn"] == 7, r
    assert r["wide_equals_whole_row"], r  # the same threshold: the same draws from the same seed
    for name in ("full_row", "top_k"):  # 1000 draws (the interpreter is slow): a frequency's std. is at most 0.016
        assert r[f"{name}_max_error"] < 0.07, r  # (tests/gpu checks 20,000 draws at both head widths, compiled)
    assert r["wide_top_k_max_error"] < 0.1, r  # 500 draws: std. at most 0.022
    assert r["repeat_equal"] and not r["next_step_equal"]


def main():
    import torch

    from common import randomize_routing_, tiny_config
    from omnimamba_hf import OmniMambaForConditionalGeneration
    from omnimamba_hf.modeling.graph_decode_omnimamba import FusedChoice
    from omnimamba_hf.modeling import triton_choice_omnimamba
    from omnimamba_hf.modeling.triton_choice_omnimamba import GREEDY_BLOCK, choose_and_feed

    out = {}
    g = torch.Generator().manual_seed(0)

    def buffers(rows, groups=1, columns=3):
        return dict(
            tokens=torch.zeros(rows, columns, dtype=torch.long), steps=torch.zeros(rows, dtype=torch.long),
            ids=torch.zeros(groups * rows, dtype=torch.long), positions=torch.arange(groups * rows) + 7,
            unfinished=torch.ones(rows, dtype=torch.bool), seed=torch.tensor([1234]),
        )  # fmt: skip

    # greedy: argmax incl. ties within and across blocks, eos / pad, two row groups fed, bf16 and float32 logits
    checked = 0
    for dtype, width in ((torch.float32, 300), (torch.bfloat16, GREEDY_BLOCK + 904)):
        logits = torch.randn(4, width, generator=g).to(dtype)
        logits[1, 17] = logits[1, 250] = 9.0  # tie in one block: the first index wins
        logits[2, 5] = logits[2, width - 3] = 9.0  # tie across blocks (bf16 case): the earlier block wins
        b = buffers(4, groups=2)
        b["unfinished"][3] = False  # a finished row gets the pad id
        eos = torch.tensor([int(logits[0].float().argmax()), -1])
        choose_and_feed(logits, **b, eos=eos, offset=1000, pad=-5)
        want = logits.float().argmax(-1)
        want[3] = -5
        assert torch.equal(b["tokens"][:, 0], want), (b["tokens"][:, 0], want)
        assert torch.equal(b["ids"], torch.cat([want, want]) + 1000) and torch.equal(b["steps"], torch.ones(4).long())
        assert torch.equal(b["positions"], torch.arange(8) + 8)
        assert b["unfinished"].tolist() == [False, True, True, False]  # row 0 chose eos
        checked += 2
    out["greedy_checked"] = checked

    # sampling: frequencies over 1000 rows of one logits row against the warped softmax
    n, width, temperature = 1000, 16, 0.7
    row = torch.randn(width, generator=g) * 2
    row[3] = row[9] = row.sort(descending=True).values[4]  # the 5th and 6th largest tie: top-5 keeps both
    scores = row / temperature
    for name, top_k in (("full_row", 0), ("top_k", 5)):
        b = buffers(n)
        choose_and_feed(row.expand(n, width).contiguous(), **b, do_sample=True, temperature=temperature, top_k=top_k)
        freq = torch.bincount(b["tokens"][:, 0], minlength=width).double() / n
        kept = scores >= scores.topk(top_k).values[-1] if top_k else torch.ones(width, dtype=torch.bool)
        p = torch.where(kept, scores, torch.tensor(float("-inf"))).double().softmax(-1)
        out[f"{name}_max_error"] = (freq - p).abs().max().item()
        if top_k:
            out["outside_top_k"] = int(freq[~kept].gt(0).sum())
            out["threshold_ties_drawn"] = int(min(freq[3], freq[9]) > 0)
    # the same with the row taken as "wide": blocks of 8 columns, each block's top k, the threshold from those
    whole_row = b["tokens"][:, 0].clone()
    triton_choice_omnimamba.TOP_K_MAX_WIDTH, triton_choice_omnimamba.GREEDY_BLOCK = 8, 8
    n = 500  # three launches per row: fewer rows in the interpreter
    b = buffers(n)
    choose_and_feed(row.expand(n, width).contiguous(), **b, do_sample=True, temperature=temperature, top_k=5)
    freq = torch.bincount(b["tokens"][:, 0], minlength=width).double() / n
    out["wide_top_k_max_error"] = (freq - p).abs().max().item()
    out["wide_outside_top_k"] = int(freq[~kept].gt(0).sum())
    out["wide_threshold_ties_drawn"] = int(min(freq[3], freq[9]) > 0)
    out["wide_equals_whole_row"] = bool(torch.equal(b["tokens"][:, 0], whole_row[:n]))
    assert torch.equal(b["ids"], b["tokens"][:, 0]) and bool((b["steps"] == 1).all())  # recorded and fed back
    assert not triton_choice_omnimamba.fused_choice_supported(16, True, triton_choice_omnimamba.WIDE_TOP_K_MAX + 1)
    # scores that differ only in their lowest bits (every bisection step decides), negative and positive, 40 columns
    close = torch.tensor([1.0 + 2.0**-23 * i for i in range(20)] + [-1.0 - 2.0**-23 * i for i in range(20)])
    close = close[torch.randperm(40, generator=g)]
    b = buffers(150)  # each kept score is drawn with p = 1/7: all seven appear
    choose_and_feed(close.expand(150, 40).contiguous(), **b, do_sample=True, top_k=7)
    inside = close >= close.topk(7).values[-1]
    drawn = torch.bincount(b["tokens"][:, 0], minlength=40) > 0
    out["wide_close_outside_top_k"] = int((drawn & ~inside).sum())
    out["wide_close_inside_drawn"] = int((drawn & inside).sum())
    triton_choice_omnimamba.TOP_K_MAX_WIDTH, triton_choice_omnimamba.GREEDY_BLOCK = 16384, GREEDY_BLOCK
    # seeded: the same (seed, step) draws the same tokens, the next step other ones
    logits = torch.randn(64, 100, generator=g).expand(64, 100).contiguous()
    draws = []
    for steps in (0, 0, 1):
        b = buffers(64)
        b["steps"].fill_(steps)
        choose_and_feed(logits, **b, do_sample=True, top_k=20)
        draws.append(b["tokens"][torch.arange(64), steps])
    out["repeat_equal"] = bool(torch.equal(draws[0], draws[1]))
    out["next_step_equal"] = bool(torch.equal(draws[0], draws[2]))

    # decode() with the fused greedy choice against the PyTorch choice (the step itself is the PyTorch step on CPU)
    torch.manual_seed(0)
    config = tiny_config()
    model = randomize_routing_(OmniMambaForConditionalGeneration(config).eval(), seed=1, scale=0.3)
    dec = model.graph_decoder("mmu", 2, "static")
    state = (dec.conv.clone(), dec.ssm.clone())
    start, eos = torch.tensor([3, 5]), (7, 11)
    fused = dec.decode(start, 12, 9, FusedChoice(), eos=eos, pad=0)
    dec.conv.copy_(state[0])
    dec.ssm.copy_(state[1])
    plain = dec.decode(start, 12, 9, eos=eos, pad=0)
    out["decode_equal"] = bool(torch.equal(fused, plain))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
