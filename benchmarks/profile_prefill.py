"""Where does the MMU prefill (one 384-px image + 64 prompt tokens = 797 positions, OmniMamba-1.3B, bf16, batch 1) spend
its time? Eager embedding, graph-replayed vision towers, each graph-replayed chunk of the Mamba stack, and a
kernel-level profile of the whole prefill. With --t2i: where a T2I `generate()` spends its time before the first
decode step (embeddings, the graph prefill of the 72-position prompt, loading the decoder's state, the image-code
table).

    python benchmarks/profile_prefill.py [--t2i]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
from omnimamba_hf.modeling.graph_prefill_omnimamba import chunk_lengths


def wall_ms(fn, repeat=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def t2i_first_token(model):
    from omnimamba_hf.modeling.graph_decode_omnimamba import image_code_table

    c = model.config
    prompt = torch.randint(0, 50000, (1, c.t2i_prompt_length), device="cuda")
    model.generate(prompt, generation_mode="image")  # captures
    step = lambda: model._t2i_stepper(prompt, "cuda_graph")(None, None).argmax(-1)  # noqa: E731
    embeds, _ = model.model.build_inputs_embeds(prompt, None, None, None, "t2i")
    prefill = model.graph_prefill("t2i", 1)
    decoder = model.graph_decoder("t2i", 1)
    print(f"T2I before the first decode step: {wall_ms(step):.2f} ms = embeddings "
          f"{wall_ms(lambda: model.model.build_inputs_embeds(prompt, None, None, None, 't2i')):.2f} + graph prefill "
          f"of {prompt.shape[1]} positions (chunks {prefill.chunk_lengths(prompt.shape[1])}) {wall_ms(lambda: prefill(embeds)):.2f}"
          f" + the decoder's load_state {wall_ms(lambda: decoder.load_state(prefill.cache)):.2f} (of which the "
          f"image-code table {wall_ms(lambda: image_code_table(model)):.2f})")  # fmt: skip


@torch.no_grad()
def main():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OmniMambaForConditionalGeneration(OmniMambaConfig()).to(torch.bfloat16).eval()
    if "--t2i" in sys.argv:
        return t2i_first_token(model)
    c = model.config
    ids = [c.mmu_token_id, c.soi_token_id] + [c.image_token_id] * c.num_image_tokens + [c.eoi_token_id, c.sot_token_id]
    ids = torch.tensor([ids + list(range(100, 164))], device="cuda")
    size = c.vision_config.image_size
    pixels = torch.randn(1, 2, 3, size, size, device="cuda", dtype=torch.bfloat16)
    print(f"{ids.shape[1]} positions = chunks {chunk_lengths(ids.shape[1])}")
    total = wall_ms(lambda: model._omnimamba_prefill(ids, "mmu", "cuda_graph", pixel_values=pixels))
    vision = wall_ms(lambda: model._graph_image_features(pixels))
    feats = model._graph_image_features(pixels)
    embed = wall_ms(lambda: model.model.build_inputs_embeds(ids, pixels, None, None, "mmu", image_features=feats))
    embeds, _ = model.model.build_inputs_embeds(ids, pixels, None, None, "mmu", image_features=feats)
    prefill = model.graph_prefill("mmu", 1)
    lm = wall_ms(lambda: prefill(embeds))
    print(f"whole prefill {total:.1f} ms = vision graph {vision:.1f} + eager embeddings {embed:.1f} + Mamba stack {lm:.1f}")
    for length in sorted(set(chunk_lengths(ids.shape[1])), reverse=True):
        graph = prefill._chunks[(length, False)][0]
        print(f"  chunk of {length:4d}: graph replay {wall_ms(graph.replay):.2f} ms")
    # the continuation conv (F.conv1d depthwise) vs alternatives, one layer's shapes at 512 positions
    mixer = model.model.language_model.layers[0].mixer
    x = torch.randn(1, mixer.conv_dim, 512 + 3, device="cuda", dtype=torch.bfloat16)
    w = mixer.conv1d.weight
    print(f"  depthwise conv1d 4352 x 515 (cuDNN): {wall_ms(lambda: torch.nn.functional.conv1d(x, w, mixer.conv1d.bias, groups=mixer.conv_dim), 50) * 1e3:.0f} us (wall, incl. launch)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model._omnimamba_prefill(ids, "mmu", "cuda_graph", pixel_values=pixels)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
