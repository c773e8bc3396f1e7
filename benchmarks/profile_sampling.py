"""What does choosing a token cost inside a decode graph? Each piece of the in-graph choice
(`generation_omnimamba._in_graph_choice`: transformers' warpers, softmax, multinomial / argmax) timed alone, 20 calls
replayed as one CUDA graph, for the T2I (16384) and MMU (50288) head widths at batch 1 and 16. A decode step of the
1.3B model takes ~1.2 ms at batch 1; what a choice costs is added to every token.

    python benchmarks/profile_sampling.py
"""

import torch
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

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
            for k in (1000, 100):
                warpers = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(k)])
                pieces[f"whole top-k {k} choice"] = lambda w=warpers: torch.multinomial(
                    w(None, logits.float()).softmax(-1), 1
                )
            row = {name: graph_us_per_call([fn] * 20) for name, fn in pieces.items()}
            print(f"vocab {vocab}, batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
