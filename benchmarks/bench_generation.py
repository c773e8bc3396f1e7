"""Generation speed of OmniMamba-1.3B (random weights) on one GPU, as ratios measured in one run.

    python benchmarks/bench_generation.py --out results.json            # everything (fits one 10-minute device call)
    python benchmarks/bench_generation.py --tiny --skip-baselines        # CPU smoke test of the script itself

Prints, for the full 1.3B configuration in bf16:
  1. T2I: ms per image token (graph-replay step and whole generate()), seconds per 256-token image, images/s, batch
     1 / 16 / 64;
  2. MMU: image encoding + prefill of 733 + 64 positions, then ms per generated token;
  3. each decode figure over the memory floor of the same run (weight bytes one step must read ÷ the measured
     device-copy bandwidth, bytes read + written);
  4. transformers' generic `Mamba2ForCausalLM.generate` at the same width/depth, and a ~1.3B Llama (eager, and
     static cache + torch.compile) at 256 / 2k / 8k / 16k context: per-token time and peak memory, side by side with
     OmniMamba's recurrent step at the same lengths (the recurrent step does not depend on length);
  5. OmniMamba's peak memory vs generated length (flat).
Transformer per-token cost grows with context, so its "time to generate N tokens" is measured as the per-token time at
contexts 256, 2k, 8k and 16k (prefill to that length, then time decode steps) and integrated with the trapezoid rule.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

import omnimamba_hf
from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
from omnimamba_hf.modeling.graph_decode_omnimamba import uses_image_code_table
from omnimamba_hf.modeling.mixer_omnimamba import ssm_state_dtype


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=1):
    """Median wall time of fn() in seconds (device synchronised)."""
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def decode_ms_per_token(total_s: float, first_s: float, tokens: int) -> float:
    """ms per token after the first, (T(N) - T(1)) / (N - 1): how bench_original_decode.py times the original."""
    return (total_s - first_s) / (tokens - 1) * 1e3


# generate() arguments that make it run the host loop over the one-step graph (it returns every step's logits)
HOST_LOOP = dict(return_dict_in_generate=True, output_logits=True)


def event_time_ms(fn, iters=50, warmup=5):
    """Mean device time of fn() in ms, with CUDA events (falls back to wall time on CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        return timed(lambda: [fn() for _ in range(iters)]) / iters * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, the floor's bandwidth."""
    if not torch.cuda.is_available():
        return float("nan")
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = event_time_ms(lambda: y.copy_(x), iters=20)
    return 2 * n / (ms / 1e3) / 1e9


def step_weight_bytes(model, task: str, batch: int = 1) -> int:
    """Bytes one decode step must move at least: the weights it reads (every block, the final norm, the task's adapter,
    one embedding row + position row per row of the batch, the task's head, and for T2I the image-embedding MLP —
    unless the decoder reads the per-call image-code table instead, as on CUDA in half precision) plus the recurrent
    state, read and written once (conv state in the model dtype, SSM state in float32 or, with
    `config.ssm_state_dtype="model"`, in the model dtype)."""
    lm = model.model.language_model
    total = 0
    for name, p in lm.layers.named_parameters():
        if "task_adapters" in name and f"task_adapters.{task}." not in name:
            continue
        total += p.numel() * p.element_size()
    total += lm.norm_f.weight.numel() * lm.norm_f.weight.element_size()
    hidden = model.config.text_config.hidden_size
    elt = lm.embeddings.weight.element_size()
    total += 2 * batch * hidden * elt  # per row: one embedding (or code-table) row + one position row
    head = model.lm_head if task == "mmu" else model.image_head
    total += head.weight.numel() * head.weight.element_size()
    if task == "t2i" and not uses_image_code_table(lm.embeddings.weight.device, lm.embeddings.weight.dtype):
        total += sum(p.numel() * p.element_size() for p in model.model.image_embeddings.mlp.parameters())
    mixer = lm.layers[0].mixer
    conv = mixer.conv_dim * mixer.conv_kernel_size * elt
    state_bytes = ssm_state_dtype(model.config, lm.embeddings.weight.dtype).itemsize
    ssm = mixer.num_heads * mixer.head_dim * mixer.ssm_state_size * state_bytes
    total += 2 * batch * len(lm.layers) * (conv + ssm)
    return total


def bench_omnimamba(model, bandwidth, tiny: bool):
    results = {}
    config = model.config
    device = model.device
    V = config.text_vocab_size
    batches = (1, 2) if tiny else (1, 16, 64)
    def floor_ms(task, batch=1):
        return step_weight_bytes(model, task, batch) / (bandwidth * 1e9) * 1e3

    for task in ("t2i", "mmu"):
        results[f"{task}_floor_ms"] = floor_ms(task)
    n_img = config.num_generated_image_tokens
    for B in batches:
        prompt = torch.randint(0, 50000 if not tiny else 200, (B, config.t2i_prompt_length), device=device)
        t_first = timed(lambda: model.generate(prompt, generation_mode="image"))  # compile + capture
        t_gen = timed(lambda: model.generate(prompt, generation_mode="image"), repeat=3)
        # the host loop over the one-step graph, which generate() runs when asked for logits (the default decode
        # makes its choices inside the graph: OmniMambaGraphDecoder.decode)
        model.generate(prompt, generation_mode="image", **HOST_LOOP)
        t_host = timed(lambda: model.generate(prompt, generation_mode="image", **HOST_LOOP), repeat=3)
        # the original's per-token measure, (T(256) - T(1)) / 255: T(1) is what generate() runs before its first
        # decode step (prefill, image-code table, first choice); the number of image tokens is fixed by the VQ grid
        decoder = model._resolve_decoder("auto")
        t_one = timed(lambda: model._t2i_stepper(prompt, decoder)(None, None).argmax(-1), repeat=3)
        alike_ms, host_ms = decode_ms_per_token(t_gen, t_one, n_img), decode_ms_per_token(t_host, t_one, n_img)
        sampled = {}
        if B == 1:  # top-k sampling, in the graph and in the host loop
            kw = dict(generation_mode="image", do_sample=True, top_k=1000, temperature=1.0)
            for name, extra in (("in_graph", {}), ("host_loop", HOST_LOOP)):
                model.generate(prompt, **kw, **extra)
                t = timed(lambda: model.generate(prompt, **kw, **extra), repeat=3)
                sampled[f"ms_per_token_decode_top_k_{name}"] = decode_ms_per_token(t, t_one, n_img)
            print(f"T2I batch 1, top-k sampling: {sampled['ms_per_token_decode_top_k_in_graph']:.3f} ms/token "
                  f"(host loop: {sampled['ms_per_token_decode_top_k_host_loop']:.3f})", flush=True)  # fmt: skip
        dec = model.graph_decoder("t2i", B)
        ids = torch.full((B,), V + 1, device=device)
        step_ms = event_time_ms(lambda: dec.step(ids, config.t2i_prompt_length), iters=100)
        results[f"t2i_b{B}"] = {
            "first_call_s": t_first,
            "generate_s_per_batch": t_gen,
            "ms_per_token_generate": t_gen / n_img * 1e3,
            "first_token_ms": t_one * 1e3,
            "ms_per_token_decode": alike_ms,
            "generate_s_host_loop": t_host,
            "ms_per_token_decode_host_loop": host_ms,
            **sampled,
            "ms_per_step_graph": step_ms,
            "s_per_image": t_gen / B,
            "images_per_s": B / t_gen,
            "floor_ms": floor_ms("t2i", B),
            "step_over_floor": step_ms / floor_ms("t2i", B),
        }
        print(f"T2I batch {B:3d}: step {step_ms:.3f} ms ({step_ms / floor_ms('t2i', B):.2f}x floor), "
              f"generate {t_gen:.3f} s per batch, {B / t_gen:.1f} images/s; first token {t_one * 1e3:.1f} ms, then "
              f"{alike_ms:.3f} ms/token (host loop: {host_ms:.3f})", flush=True)  # fmt: skip

    # the two graph-decoder backends side by side (batch 1)
    if torch.cuda.is_available():
        from omnimamba_hf.modeling.graph_decode_omnimamba import mamba_kernels_for_decode

        backends = {}
        for backend in ("inductor", "kernels") if mamba_kernels_for_decode() else ("inductor",):
            for task in ("t2i", "mmu"):
                dec = model.graph_decoder(task, 1, backend=backend)
                tok = torch.full((1,), V + 1 if task == "t2i" else 100, device=device)
                backends[f"{task}_{backend}"] = event_time_ms(lambda: dec.step(tok, 80), iters=100)
        results["step_ms_by_backend_b1"] = backends
        print("graph decode step by backend (batch 1, ms):", {k: round(v, 3) for k, v in backends.items()}, flush=True)

    # MMU: one image + 64 prompt tokens = 733 + 64 positions, then decode
    n_slots = config.num_image_tokens
    prompt_tokens = 4 if tiny else 64
    ids = [config.mmu_token_id, config.soi_token_id] + [config.image_token_id] * n_slots + [config.eoi_token_id, config.sot_token_id]
    ids = torch.tensor([ids + list(range(100, 100 + prompt_tokens))], device=device)
    size = config.vision_config.image_size
    pixels = torch.randn(1, 2, 3, size, size, device=device, dtype=model.dtype)
    from transformers import DynamicCache

    def prefill():
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True, logits_to_keep=1)

    decoder = "cuda_graph" if torch.cuda.is_available() else "static"

    def graph_prefill():  # what generate() runs: eager embeddings + graph-replayed vision towers and Mamba stack
        return model._omnimamba_prefill(ids, "mmu", decoder, pixel_values=pixels)

    with torch.no_grad():
        prefill()
        eager_prefill_ms = timed(prefill, repeat=5) * 1e3
        eager_vision_ms = timed(lambda: model.model.get_image_features(pixels), repeat=5) * 1e3
        graph_prefill()  # capture
        prefill_ms = timed(graph_prefill, repeat=10) * 1e3
        vision_ms = eager_vision_ms
        if decoder == "cuda_graph":
            model._graph_image_features(pixels)
            vision_ms = timed(lambda: model._graph_image_features(pixels), repeat=10) * 1e3
    new = 8 if tiny else 256
    model.generate(ids, pixel_values=pixels, max_new_tokens=new, eos_token_id=None)  # compile + capture
    t = timed(lambda: model.generate(ids, pixel_values=pixels, max_new_tokens=new, eos_token_id=None), repeat=3)
    t_one = timed(lambda: model.generate(ids, pixel_values=pixels, max_new_tokens=1, eos_token_id=None), repeat=3)
    host_loop = dict(pixel_values=pixels, max_new_tokens=new, eos_token_id=None, **HOST_LOOP)
    model.generate(ids, **host_loop)
    t_host = timed(lambda: model.generate(ids, **host_loop), repeat=3)
    alike_ms, host_ms = decode_ms_per_token(t, t_one, new), decode_ms_per_token(t_host, t_one, new)
    # top-k sampling with transformers' default k (50): inside the graph with the one-launch choice (on CUDA; three
    # launches over blocks of the 50,288-wide row) and with the PyTorch choice, and in the host loop
    from omnimamba_hf.modeling import generation_omnimamba

    sample_kw = dict(pixel_values=pixels, max_new_tokens=new, eos_token_id=None, do_sample=True, top_k=50)
    sampled = {}
    for name, extra, fused_choice in (("in_graph", {}, True), ("in_graph_pytorch_choice", {}, False),
                                      ("host_loop", HOST_LOOP, True)):  # fmt: skip
        generation_omnimamba.USE_FUSED_CHOICE = fused_choice
        model.generate(ids, **sample_kw, **extra)
        t_sampled = timed(lambda: model.generate(ids, **sample_kw, **extra), repeat=3)
        sampled[f"ms_per_token_decode_top_k_{name}"] = decode_ms_per_token(t_sampled, t_one, new)
    generation_omnimamba.USE_FUSED_CHOICE = True
    dec = model.graph_decoder("mmu", 1)
    tok = torch.full((1,), 100, device=device)
    step_ms = event_time_ms(lambda: dec.step(tok, ids.shape[1]), iters=100)
    decode_ms = (t * 1e3 - prefill_ms) / (new - 1)
    results["mmu_b1"] = {
        "prompt_positions": ids.shape[1],
        "image_encoding_ms": vision_ms,
        "image_plus_prefill_ms": prefill_ms,
        "eager_image_encoding_ms": eager_vision_ms,
        "eager_image_plus_prefill_ms": eager_prefill_ms,
        "ms_per_step_graph": step_ms,
        "ms_per_token_generate": decode_ms,
        "first_token_ms": t_one * 1e3,
        "ms_per_token_decode": alike_ms,
        "ms_per_token_decode_host_loop": host_ms,
        **sampled,
        "step_over_floor": step_ms / results["mmu_floor_ms"],
        "generate_over_floor": decode_ms / results["mmu_floor_ms"],
    }
    print(f"MMU batch 1: eager image+prefill {eager_prefill_ms:.1f} ms (vision {eager_vision_ms:.1f} ms)", flush=True)
    print(f"MMU batch 1: image+prefill of {ids.shape[1]} positions {prefill_ms:.1f} ms (vision {vision_ms:.1f} ms); "
          f"step {step_ms:.3f} ms ({step_ms / results['mmu_floor_ms']:.2f}x floor); generate {decode_ms:.3f} ms/token; "
          f"first token {t_one * 1e3:.1f} ms, then {alike_ms:.3f} ms/token (host loop: {host_ms:.3f})",
          flush=True)  # fmt: skip
    print("MMU batch 1, top-k 50 sampling: " + ", ".join(f"{k.removeprefix('ms_per_token_decode_top_k_')} {v:.3f}"
                                                         for k, v in sampled.items()) + " ms/token", flush=True)  # fmt: skip

    # peak memory vs generated length: the recurrent state does not grow (other batch sizes' decoders dropped first)
    if torch.cuda.is_available():
        mem = {}
        dec = None
        model.reset_graph_decoders()
        gc.collect()  # dropped decoders / graphs reference the model (cycles): free their pools now
        torch.cuda.empty_cache()
        dec = model.graph_decoder("t2i", 1)
        ids1 = torch.full((1,), V + 1, device=device)
        steps_done = 0
        torch.cuda.reset_peak_memory_stats()
        for target in (256, 2048, 8192, 16384):
            while steps_done < target:
                dec.step(ids1, config.t2i_prompt_length + steps_done % 200)  # positions stay inside the table
                steps_done += 1
            sync()
            mem[target] = torch.cuda.max_memory_allocated()
        results["omnimamba_peak_memory_bytes_vs_tokens"] = mem
        print("OmniMamba peak memory vs decoded tokens:", {k: f"{v / 2**30:.3f} GiB" for k, v in mem.items()}, flush=True)
        # Language-model-only figure, comparable with a text-only Llama: the vision towers, projector and VQ stay
        # resident but are never touched by decoding, so their weight bytes come off the peak.
        unused = [model.model.vision_model, model.model.projector, model.model.vqmodel]
        unused_bytes = sum(p.numel() * p.element_size() for m in unused for p in m.parameters())
        lm_only = {k: v - unused_bytes for k, v in mem.items()}
        results["omnimamba_lm_only_peak_memory_bytes_vs_tokens"] = lm_only
        print("OmniMamba (language model only) peak memory:", {k: f"{v / 2**30:.3f} GiB" for k, v in lm_only.items()},
              flush=True)  # fmt: skip
    return results


def bench_mamba2_generic(config, device, dtype, tiny):
    """transformers' Mamba2ForCausalLM.generate at the same width and depth (its own kernels if installed)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    t = config.text_config
    mc = Mamba2Config(
        hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers, num_heads=t.num_heads, head_dim=t.head_dim,
        state_size=t.state_size, n_groups=t.n_groups, vocab_size=t.vocab_size, expand=t.expand, chunk_size=t.chunk_size,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device(device):
        model = Mamba2ForCausalLM(mc).to(dtype).eval()
    ids = torch.randint(0, min(1000, t.vocab_size), (1, 64), device=device)
    new = 8 if tiny else 64
    model.generate(ids, max_new_tokens=4, do_sample=False)
    t_short = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False), repeat=3)
    t_long = timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False), repeat=3)
    ms = (t_long - t_short) / (new - 1) * 1e3
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"transformers Mamba2ForCausalLM.generate: {ms:.2f} ms/token", flush=True)
    return {"ms_per_token": ms}


def bench_llama(device, dtype, tiny, lengths):
    """A ~1.3B Llama: per-token decode time and peak memory at several context lengths, eager and static+compiled."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache, StaticCache

    if tiny:
        lc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=max(lengths) + 64)  # fmt: skip
    else:  # 1.34B parameters: 24 layers x 2048, MHA, 50288 vocab (GPT-NeoX size) — close to the 1.3B OmniMamba LM
        lc = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=50288, max_position_embeddings=max(lengths) + 64,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(lc).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    out = {"parameters": params}
    steps = 16
    max_len = max(lengths) + steps + 8
    static_cache = None
    compiled = None
    for mode in ("eager", "static_compiled"):
        per = {}
        for L in lengths:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, lc.vocab_size, (1, L), device=device)
            with torch.no_grad():
                if mode == "eager":
                    cache, fwd = DynamicCache(config=lc), model
                else:  # one static cache sized for the longest context, one compilation, reused for every length
                    if static_cache is None:
                        static_cache = StaticCache(config=lc, max_cache_len=max_len)
                        compiled = model if tiny else torch.compile(model, mode="reduce-overhead", fullgraph=True)
                    static_cache.reset()
                    cache, fwd = static_cache, compiled
                model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                pos = [L]

                def one():
                    p = torch.tensor([[pos[0]]], device=device)
                    fwd(input_ids=tok, cache=cache, position_ids=p, use_cache=True)
                    pos[0] += 1

                for _ in range(3):  # warm-up / compile / capture
                    one()
                ms = timed(lambda: [one() for _ in range(steps)]) / steps * 1e3
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
            per[L] = {"ms_per_token": ms, "peak_memory_bytes": peak}
            print(f"Llama-{params / 1e9:.2f}B {mode}: context {L}: {ms:.2f} ms/token, peak {peak / 2**30:.2f} GiB", flush=True)
            if mode == "eager":
                del cache
        out[mode] = per
    del model
    return out


def integrate(per_token_ms: dict[int, float], n: int) -> float:
    """Seconds to generate n tokens from per-token times measured at a few context lengths (trapezoid, from 0)."""
    points = sorted((k, v) for k, v in per_token_ms.items() if k <= n)
    xs = [0] + [k for k, _ in points]
    ys = [points[0][1]] + [v for _, v in points]
    total = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return total / 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test of this script)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ssm-state-dtype", default="float32", choices=["float32", "model"],
                        help="config.ssm_state_dtype of the port: its recurrent state in float32 (default) or in the "
                             "model dtype, as the original keeps it")  # fmt: skip
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--only", choices=["omnimamba", "baselines"], default=None, help="run one half (two device calls)")
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--original", default=None, metavar="PATH",
                        help="checkout of the original OmniMamba code: also time its own CUDA-graph decode (cg=True) "
                             "in the same run")  # fmt: skip
    parser.add_argument("--original-without-causal-conv1d", action="store_true",
                        help="with --original: also time it with causal-conv1d hidden (a subprocess), the "
                             "configuration of the issue's reference figures")  # fmt: skip
    args = parser.parse_args(argv)
    if args.original:  # fail before the long run, not after it
        from bench_original_decode import check_requirements

        try:
            check_requirements(args.original)
        except (RuntimeError, FileNotFoundError) as e:
            parser.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.tiny:
        sys.path.insert(0, "tests")
        from common import tiny_config

        config = tiny_config()
    else:
        config = OmniMambaConfig()
    config.ssm_state_dtype = args.ssm_state_dtype
    with torch.device(device):
        model = OmniMambaForConditionalGeneration(config).to(dtype).eval()
    bandwidth = copy_bandwidth_gbs() if device == "cuda" else 100.0
    from omnimamba_hf.modeling.mixer_omnimamba import mamba_kernels

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "omnimamba_hf": omnimamba_hf.__version__,
        "mamba_ssm_kernels": mamba_kernels() is not None,
        "dtype": args.dtype,
        "ssm_state_dtype": args.ssm_state_dtype,
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": bandwidth,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(env), flush=True)
    results = {"env": env}
    def save():  # after every part: a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)

    if args.only != "baselines":
        results["omnimamba"] = bench_omnimamba(model, bandwidth, args.tiny)
        save()
    if not args.skip_baselines and args.only != "omnimamba":
        model.reset_graph_decoders()
        model = None
        gc.collect()  # the captured graphs reference the model: only a collection frees its memory
        torch.cuda.empty_cache() if device == "cuda" else None
        results["mamba2_generic"] = bench_mamba2_generic(config, device, dtype, args.tiny)
        lengths = (256, 512) if args.tiny else (256, 2048, 8192, 16384)
        results["llama"] = bench_llama(device, dtype, args.tiny, lengths)
        save()
    if args.original:  # the original at the same size and dtype, after the port's model is freed
        from bench_original_decode import bench_original

        if model is not None:
            model.reset_graph_decoders()
        model = None  # noqa: F841 (frees the port's weights and graphs)
        gc.collect()
        torch.cuda.empty_cache()
        try:
            results["original"] = bench_original(args.original, dtype, args.tiny)
        except Exception as e:  # keep the numbers measured so far
            import traceback

            traceback.print_exc()
            results["original"] = {"error": repr(e)}
        if args.original_without_causal_conv1d:
            results["original_without_causal_conv1d"] = original_in_subprocess(args.original, args.dtype, args.tiny)
    if "omnimamba" in results:
        summary(results)
    save()


def original_in_subprocess(path: str, dtype: str, tiny: bool) -> dict:
    """bench_original_decode.py --without-causal-conv1d in a fresh process (this one has imported causal-conv1d)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "original.json")
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_original_decode.py"),
               "--original", path, "--dtype", dtype, "--without-causal-conv1d", "--out", out] + (["--tiny"] if tiny else [])  # fmt: skip
        run = subprocess.run(cmd)
        if run.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit status {run.returncode}"}
        with open(out) as f:
            return json.load(f)[dtype]


def vs_original(orig: dict, o: dict, m: dict, label: str) -> None:
    """Print the speed-ups over one measurement of the original's CUDA-graph decode."""
    if "t2i_b1" in orig and "t2i_b1" in o:
        ot, t = orig["t2i_b1"], o["t2i_b1"]
        x_step = ot["ms_per_token_decode"] / t["ms_per_step_graph"]
        x_gen = ot["ms_per_token_call"] / t["ms_per_token_generate"]
        print(f"vs the original's CUDA-graph decode{label}: T2I {ot['ms_per_token_decode']:.2f} ms/token -> "
              f"{x_step:.2f}x faster (ours step {t['ms_per_step_graph']:.3f} ms); "
              f"{ot['s_per_image']:.3f} s/image -> {x_gen:.2f}x faster "
              f"(ours generate() {t['s_per_image']:.3f} s/image, {t['ms_per_token_generate']:.2f} ms/token)")  # fmt: skip
        if "ms_per_token_decode" in t:  # both measured alike: (T(256) - T(1)) / 255 of a generate call
            print(f"  T2I per token measured alike, (T(256) - T(1)) / 255 of generate(): "
                  f"{ot['ms_per_token_decode']:.3f} -> {t['ms_per_token_decode']:.3f} ms = "
                  f"{ot['ms_per_token_decode'] / t['ms_per_token_decode']:.2f}x faster")  # fmt: skip
    if "mmu_b1" in orig:
        om = orig["mmu_b1"]["ms_per_token_decode"]
        print(f"vs the original's CUDA-graph decode{label}: MMU {om:.2f} ms/token -> "
              f"{om / m['ms_per_step_graph']:.2f}x faster (ours step {m['ms_per_step_graph']:.3f} ms), "
              f"{om / m['ms_per_token_generate']:.2f}x "
              f"(ours generate() {m['ms_per_token_generate']:.3f} ms/token)")  # fmt: skip
        if "ms_per_token_decode" in m:
            print(f"  MMU per token measured alike, (T(N) - T(1)) / (N - 1) of generate(): {om:.3f} -> "
                  f"{m['ms_per_token_decode']:.3f} ms = {om / m['ms_per_token_decode']:.2f}x faster")  # fmt: skip


def summary(r):
    o = r["omnimamba"]
    print("\n==== summary (one run) ====")
    print(f"memory floor per decode step: T2I {o['t2i_floor_ms']:.3f} ms, MMU {o['mmu_floor_ms']:.3f} ms "
          f"(copy bandwidth {r['env']['copy_bandwidth_GBps']:.0f} GB/s)")  # fmt: skip
    for k, v in o.items():
        if k.startswith("t2i_b"):
            print(f"T2I {k[4:]}: {v['ms_per_step_graph']:.3f} ms/step = {v['step_over_floor']:.2f}x floor; "
                  f"{v['ms_per_token_generate']:.3f} ms/token in generate(); {v['s_per_image']:.3f} s/image; "
                  f"{v['images_per_s']:.1f} images/s")  # fmt: skip
    m = o["mmu_b1"]
    print(f"MMU b1: image+prefill {m['image_plus_prefill_ms']:.1f} ms for {m['prompt_positions']} positions; "
          f"{m['ms_per_step_graph']:.3f} ms/step = {m['step_over_floor']:.2f}x floor; "
          f"{m['ms_per_token_generate']:.3f} ms/token in generate() = {m['generate_over_floor']:.2f}x floor")  # fmt: skip
    for key, label in (("original", ""), ("original_without_causal_conv1d", " (causal-conv1d hidden)")):
        vs_original(r.get(key, {}), o, m, label)
    ours = m["ms_per_step_graph"]
    if "mamba2_generic" in r:
        g = r["mamba2_generic"]["ms_per_token"]
        print(f"vs transformers Mamba2 generate: {g:.2f} ms/token -> {g / ours:.1f}x faster")
    if "llama" in r:
        for mode in ("eager", "static_compiled"):
            per = {int(k): v["ms_per_token"] for k, v in r["llama"][mode].items()}
            for n in sorted(per):
                t_llama = integrate(per, n)
                t_ours = ours * n / 1e3
                mem_l = r["llama"][mode][n]["peak_memory_bytes"]
                lm_mem = {int(k): v for k, v in o.get("omnimamba_lm_only_peak_memory_bytes_vs_tokens", {}).items()}
                mem_o = lm_mem.get(n, 0)
                ratio = (f", peak memory (language models only) {mem_o / 2**30:.2f} vs {mem_l / 2**30:.2f} GiB = "
                         f"{1 - mem_o / mem_l:.0%} less") if mem_l and mem_o else ""  # fmt: skip
                print(f"vs Llama {mode} at {n} tokens: {t_llama:.2f} s vs {t_ours:.2f} s -> {t_llama / t_ours:.1f}x faster{ratio}")
    mem = o.get("omnimamba_peak_memory_bytes_vs_tokens")
    if mem:
        vals = list(mem.values())
        print(f"OmniMamba peak memory 256 -> 16k tokens: {min(vals) / 2**30:.3f} .. {max(vals) / 2**30:.3f} GiB "
              f"({(max(vals) - min(vals)) / min(vals) * 100:.2f}% spread)")  # fmt: skip


if __name__ == "__main__":
    main()
