"""Where does one decode step of OmniMamba-1.3B (bf16, batch 1) spend its time? Kernel-level profile of the graph
decoder's step for each backend, and the GEMV rates of the two big projections against the copy bandwidth.

    python benchmarks/profile_decode_step.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration


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


def main():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OmniMambaForConditionalGeneration(OmniMambaConfig()).to(torch.bfloat16).eval()
    n = 1 << 30
    x, y = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    bw = 2 * n / (event_ms(lambda: y.copy_(x), 20) / 1e3) / 1e9
    print(f"copy bandwidth {bw:.0f} GB/s")
    for shape in ((8512, 2048), (2048, 4096), (8520, 2048), (16384, 2048), (50288, 2048)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
        ms = event_ms(lambda: torch.nn.functional.linear(v, w))
        print(f"GEMV {shape}: {ms * 1e3:.1f} us, {w.numel() * 2 / (ms / 1e3) / 1e9:.0f} GB/s")
    V = model.config.text_vocab_size
    for backend in ("kernels", "inductor"):
        dec = model.graph_decoder("t2i", 1, backend=backend)
        tok = torch.full((1,), V + 1, device="cuda")
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
        print(f"\n== backend {backend}: graph replay {graph_ms:.3f} ms/step; kernels {count:.0f}/step, "
              f"sum of kernel time {total:.3f} ms/step")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
