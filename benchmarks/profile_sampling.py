"""What does choosing a token cost inside a decode graph? Each piece of the in-graph choice
(`generation_omnimamba._in_graph_choice`: transformers' warpers, softmax, multinomial / argmax) timed alone, 20 calls
replayed as one CUDA graph, for the T2I (16384) and MMU (50288) head widths at batch 1 and 16, and the one-launch
choice that replaces them on CUDA (`triton_choice_omnimamba.choose_and_feed`; its rows include resetting the step
counter, one tiny kernel). A decode step of the
1.3B model takes ~1.2 ms at batch 1; what a choice costs is added to every token.

    python benchmarks/profile_sampling.py
"""

import torch
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omnimamba_hf.modeling.triton_choice_omnimamba import choose_and_feed, fused_choice_supported
from profile_decode_step import graph_us_per_call


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call inside a CUDA graph")
    for vocab in (16384, 50288):
        for batch in (1, 16):
            logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16) * 3
            scores = logits.float()
            probs = scores.softmax(-1)
            pieces = {
                "argmax": lambda: logits.float().argmax(-1),
                "float cast": lambda: logits.float(),
                "temperature 0.9": lambda: TemperatureLogitsWarper(0.9)(None, scores),
                "top-k 1000": lambda: TopKLogitsWarper(1000)(None, scores),
                "top-k 100": lambda: TopKLogitsWarper(100)(None, scores),
                "top-p 0.95": lambda: TopPLogitsWarper(0.95)(None, scores),
                "softmax": lambda: scores.softmax(-1),
                "multinomial": lambda: torch.multinomial(probs, 1),
            }
            for k in (1000, 50):  # 50: transformers' default top_k when do_sample=True
                warpers = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(k)])
                pieces[f"whole top-k {k} choice"] = lambda w=warpers: torch.multinomial(
                    w(None, logits.float()).softmax(-1), 1
                )
            # the one-launch choice the decoder uses on CUDA (FusedChoice), incl. the eos update and the feedback
            b = dict(
                tokens=torch.zeros(batch, 64, dtype=torch.long, device="cuda"), ids=torch.zeros(batch, dtype=torch.long, device="cuda"),
                positions=torch.zeros(batch, dtype=torch.long, device="cuda"), seed=torch.tensor([1], device="cuda"),
                unfinished=torch.ones(batch, dtype=torch.bool, device="cuda"), eos=torch.tensor([0, -1], device="cuda"),
            )  # fmt: skip
            steps = torch.zeros(batch, dtype=torch.long, device="cuda")
            reset = lambda: steps.zero_()  # noqa: E731 (20 calls per replay: the step counter must stay < 64)
            pieces["one-launch greedy"] = lambda: (choose_and_feed(logits, steps=steps, **b), reset())
            for k in (1000, 50):
                if fused_choice_supported(vocab, True, k):  # the T2I width (at the MMU width, see docs/BENCHMARKS.md)
                    pieces[f"one-launch top-k {k}"] = lambda k=k: (
                        choose_and_feed(logits, steps=steps, **b, do_sample=True, temperature=0.9, top_k=k), reset()
                    )
            pieces["one-launch sampling, whole row"] = lambda: (
                choose_and_feed(logits, steps=steps, **b, do_sample=True, temperature=0.9), reset()
            )
            row = {name: graph_us_per_call([fn] * 20) for name, fn in pieces.items()}
            print(f"vocab {vocab}, batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
