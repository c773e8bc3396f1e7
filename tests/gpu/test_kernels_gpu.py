"""GPU-only checks (skipped on CPU; run on the lent GPU with `pytest tests/gpu -s`, results recorded in
docs/BENCHMARKS.md), at the full 1.3B width with fewer layers to stay quick:

* the mamba-ssm / causal-conv1d kernel path equals the pure-PyTorch path, and the CUDA-graph decoder (both backends)
  reproduces eager decoding, for both tasks: in float32 (logits rel. error < 1e-2, greedy 64-token continuations
  identical) and in bfloat16 (rel. error reported and bounded; greedy agreement reported);
* issue #8's bf16 bar on trained weights: the demo's model (if present) and the full 48-layer 1.3B layout fine-tuned
  here on a synthetic task (~4.5 min; OMNIMAMBA_GPU_FULL_SIZE=0 skips it): greedy continuations identical.
"""

import os

import pytest
import torch

from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
from omnimamba_hf.modeling import generation_omnimamba, mixer_omnimamba

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LAYERS = int(os.environ.get("OMNIMAMBA_GPU_TEST_LAYERS", "8"))


def use_kernels(enabled: bool) -> None:
    os.environ["OMNIMAMBA_DISABLE_KERNELS"] = "0" if enabled else "1"
    mixer_omnimamba.mamba_kernels.cache_clear()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request):
    torch.manual_seed(0)
    config = OmniMambaConfig(text_config={"num_hidden_layers": LAYERS})
    with torch.device("cuda"):
        m = OmniMambaForConditionalGeneration(config).to(request.param).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():  # non-trivial adapters
        for name, p in m.named_parameters():
            if "task_adapters" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.02)
    yield m
    use_kernels(True)


def prompts(config, dtype):
    t2i = torch.randint(0, 50000, (1, config.t2i_prompt_length), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    mmu = [config.mmu_token_id, config.soi_token_id] + [config.image_token_id] * config.num_image_tokens
    mmu = torch.tensor([mmu + [config.eoi_token_id, config.sot_token_id] + list(range(1000, 1040))], device="cuda")
    pixels = torch.randn(1, 2, 3, 384, 384, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(3))
    return t2i, mmu, pixels


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def strict(model):
    return model.dtype == torch.float32


def test_kernels_are_installed():
    use_kernels(True)
    assert mixer_omnimamba.mamba_kernels() is not None, "mamba-ssm kernels did not import"


def continuation(seq, task, n=64):
    return seq[:, :n] if task == "t2i" else seq[:, -n:]


@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_kernel_path_equals_torch_path(model, task):
    t2i, mmu, pixels = prompts(model.config, model.dtype)
    kw = dict(input_ids=t2i, task="t2i") if task == "t2i" else dict(input_ids=mmu, pixel_values=pixels)
    with torch.no_grad():
        use_kernels(True)
        fast = model(**kw).logits
        use_kernels(False)
        slow = model(**kw).logits
    err = rel_err(fast, slow)
    gen = dict(generation_mode="image") if task == "t2i" else dict(pixel_values=pixels, max_new_tokens=64, eos_token_id=None)
    ids = t2i if task == "t2i" else mmu
    b = continuation(model.generate(ids, decoder="eager", **gen), task)
    use_kernels(True)
    a = continuation(model.generate(ids, decoder="eager", **gen), task)
    agree = (a == b).float().mean().item()
    print(f"\n[{model.dtype}] {task}: kernels vs PyTorch logits rel. error {err:.2e}; greedy agreement {agree:.3f}")
    assert err < (1e-2 if strict(model) else 5e-2)
    if strict(model):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["fused", "kernels", "hybrid", "inductor"])
@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_cuda_graph_decoder_equals_eager(model, task, backend):
    use_kernels(True)
    t2i, mmu, pixels = prompts(model.config, model.dtype)
    model.reset_graph_decoders()
    model.graph_decoder(task, 1, backend=backend)  # pre-build with the requested backend ("auto" key below)
    decoders = model.__dict__["_omnimamba_graph_decoders"]
    for key in list(decoders):
        decoders[key[:-1] + ("auto",)] = decoders[key]
    if task == "t2i":
        kw = dict(generation_mode="image", return_dict_in_generate=True, output_logits=True)
        ids = t2i
    else:
        kw = dict(pixel_values=pixels, max_new_tokens=64, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
        ids = mmu
    eager = model.generate(ids, decoder="eager", **kw)
    graph = model.generate(ids, decoder="cuda_graph", **kw)
    a, b = continuation(graph.sequences, task), continuation(eager.sequences, task)
    same = int((a != b).long().cumsum(-1).eq(0).sum())  # steps before the first disagreement
    errs = [rel_err(g, e) for g, e in zip(graph.logits[:same], eager.logits[:same])]
    print(f"\n[{model.dtype}] {task} {backend}: graph vs eager logits rel. error max {max(errs):.2e} over the {same} "
          f"identical steps; greedy agreement {(a == b).float().mean().item():.3f}")  # fmt: skip
    assert max(errs) < (1e-2 if strict(model) else 5e-2)
    if strict(model):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", ["fused", "kernels", "hybrid", "inductor"])
@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_choices_inside_the_graph_equal_the_host_loop(model, task, backend, batch):
    """Greedy and plain sampled `generate()` make their choices inside captured graphs (`OmniMambaGraphDecoder.decode`,
    8 steps per replay); asking for logits runs the host loop over the one-step graph instead. Same step kernels
    and, seeded, the same random numbers, so the tokens must be identical, bit for bit — with guidance too (T2I),
    with an eos that the rows choose at different steps (MMU) — and a seeded call repeats itself (the first call
    captures the graphs; its warm-up runs must not consume random numbers)."""
    use_kernels(True)
    t2i, mmu, pixels = prompts(model.config, model.dtype)
    t2i = torch.cat([t2i.roll(r, -1) for r in range(batch)])
    mmu = mmu.expand(batch, -1)
    pixels = torch.cat([pixels.roll(r, -1) for r in range(batch)])
    model.reset_graph_decoders()
    model.graph_decoder(task, batch, backend=backend)  # pre-build with the requested backend ("auto" key below)
    decoders = model.__dict__["_omnimamba_graph_decoders"]
    for key in list(decoders):
        decoders[key[:-1] + ("auto",)] = decoders[key]
    logits = dict(return_dict_in_generate=True, output_logits=True)
    sampled = dict(do_sample=True, top_k=100, top_p=0.95, temperature=0.9)  # top-p: the PyTorch choice in the graph
    fused_sampled = dict(do_sample=True, top_k=100 if task == "t2i" else 0, temperature=0.9)  # the Triton choice

    def both(ids, fused=True, **kw):
        """(host loop, graph, graph again), each from the same seed; `fused`: greedy and temperature / top-k
        sampling choose in one Triton launch (FusedChoice), else with PyTorch ops."""
        out = []
        generation_omnimamba.USE_FUSED_CHOICE = fused
        try:
            for extra in (logits, {}, {}):
                torch.manual_seed(11)
                run = model.generate(ids, decoder="cuda_graph", **kw, **extra)
                out.append(run.sequences if extra else run)
        finally:
            generation_omnimamba.USE_FUSED_CHOICE = True
        return out

    if task == "t2i":
        for fused, kw in ((True, {}), (False, {}), (True, dict(guidance_scale=3.0)), (True, sampled),
                          (True, dict(sampled, guidance_scale=2.0))):  # fmt: skip
            host, graph, again = both(t2i, fused, generation_mode="image", **kw)
            assert torch.equal(graph, again), kw
            assert torch.equal(graph, host), (fused, kw)
        _, graph, again = both(t2i, generation_mode="image", **fused_sampled)
        assert torch.equal(graph, again)  # seeded: repeats (other draws than the host loop's multinomial)
    else:
        kw = dict(pixel_values=pixels, max_new_tokens=45)
        for fused in (True, False):
            host, graph, again = both(mmu, fused, eos_token_id=None, **kw)
            assert torch.equal(graph, host) and torch.equal(again, host), fused
        new = host[:, mmu.shape[1] :]
        eos = int(new[-1, 20])  # the last row chooses it at step 20 at the latest; others maybe earlier or never
        for more in ({}, sampled):
            host, graph, again = both(mmu, eos_token_id=eos, **kw, **more)
            assert torch.equal(graph, host) and torch.equal(again, host), more
        _, graph, again = both(mmu, eos_token_id=eos, **kw, **fused_sampled)
        assert torch.equal(graph, again)
        print(f"\n[{model.dtype}] mmu {backend} batch {batch}: eos {eos} first chosen at steps "
              f"{[int((r == eos).nonzero()[0]) if bool((r == eos).any()) else None for r in new]}")  # fmt: skip
    assert {d.backend for k, d in decoders.items() if k[:2] == (task, batch)} == {backend}


def test_fused_choice_kernel_compiled():
    """The one-launch token choice compiled: greedy == torch.argmax on bf16 logits with ties at both head widths and
    64 rows; 20,000 top-k draws at the T2I and the MMU widths follow softmax(top-k(logits / temperature)) (5-sigma
    bound), never outside the top k; top-1 sampling at the MMU width keeps exactly the maximal bf16 logits."""
    from omnimamba_hf.modeling.triton_choice_omnimamba import choose_and_feed

    g = torch.Generator(device="cuda").manual_seed(0)

    def buffers(rows):
        return dict(
            tokens=torch.zeros(rows, 2, dtype=torch.long, device="cuda"),
            steps=torch.zeros(rows, dtype=torch.long, device="cuda"), ids=torch.zeros(rows, dtype=torch.long, device="cuda"),
            positions=torch.zeros(rows, dtype=torch.long, device="cuda"),
            unfinished=torch.ones(rows, dtype=torch.bool, device="cuda"), seed=torch.tensor([99], device="cuda"),
        )  # fmt: skip

    for width in (16384, 50288):
        logits = (torch.randn(64, width, device="cuda", generator=g) * 2).bfloat16()  # bf16: many exact ties
        b = buffers(64)
        choose_and_feed(logits, **b)
        assert torch.equal(b["tokens"][:, 0], logits.float().argmax(-1)), width
    # the MMU width takes its top-k threshold by a radix select over blocks: top-1 on bf16 rows with ties keeps
    # exactly the maximal logits
    logits = (torch.randn(64, 50288, device="cuda", generator=g) * 2).bfloat16()
    b = buffers(64)
    choose_and_feed(logits, **b, do_sample=True, top_k=1)
    assert torch.equal(logits.gather(1, b["tokens"][:, :1])[:, 0], logits.max(-1).values)
    for width in (16384, 50288):  # the whole row in registers / the radix select
        n, top_k, temperature = 20000, 50, 0.8
        row = torch.randn(width, device="cuda", generator=g) * 3
        b = buffers(n)
        choose_and_feed(row.expand(n, width).contiguous(), **b, do_sample=True, temperature=temperature, top_k=top_k)
        freq = torch.bincount(b["tokens"][:, 0], minlength=width).double() / n
        scores = row / temperature
        kept = scores >= scores.topk(top_k).values[-1]
        p = torch.where(kept, scores, torch.tensor(float("-inf"), device="cuda")).double().softmax(-1)
        bound = 5 * (p * (1 - p) / n).sqrt() + 1e-4
        print(f"\nfused choice, width {width}: 20,000 top-{top_k} draws, max |freq - p| {(freq - p).abs().max().item():.4f}")
        assert int(freq[~kept].gt(0).sum()) == 0
        assert bool(((freq - p).abs() <= bound).all()), ((freq - p).abs() / bound).max()


def test_fused_training_path_equals_unfused(model):
    """The mamba-ssm fused conv+scan+norm+out_proj kernel (used when no cache/padding is involved, as in the original's
    training) gives the same loss and gradients as the separate kernels (cache path) within TF32/bf16 noise."""
    os.environ["OMNIMAMBA_FUSED_SCAN"] = "1"
    use_kernels(True)
    assert mixer_omnimamba.mamba_kernels().split_conv1d_scan is not None
    config = model.config
    ids = torch.randint(0, 50000, (2, 96), device="cuda")
    labels = ids.clone()
    model.train()
    for m in model.modules():  # deterministic: no adapter dropout
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    try:
        model.zero_grad()
        fused = model(input_ids=ids, labels=labels, use_cache=False)
        fused.loss.backward()
        g_fused = model.model.language_model.layers[0].mixer.in_proj.weight.grad.clone()
        model.zero_grad()
        from transformers import DynamicCache

        cache = DynamicCache(config=config.get_text_config(decoder=True))  # a cache forces the unfused path
        unfused = model(input_ids=ids, labels=labels, use_cache=True, cache=cache)
        unfused.loss.backward()
        g_unfused = model.model.language_model.layers[0].mixer.in_proj.weight.grad.clone()
    finally:
        model.eval()
        model.zero_grad()
        os.environ.pop("OMNIMAMBA_FUSED_SCAN", None)
        use_kernels(True)
    loss_err = abs(fused.loss.item() - unfused.loss.item()) / abs(unfused.loss.item())
    grad_err = rel_err(g_fused, g_unfused)
    print(f"\n[{model.dtype}] fused vs unfused training path: loss rel. error {loss_err:.2e}, in_proj grad rel. error {grad_err:.2e}")
    assert loss_err < (1e-3 if strict(model) else 2e-2)
    assert grad_err < (5e-2 if strict(model) else 2e-1)


@pytest.mark.parametrize("state", ["float32", "model"])
@pytest.mark.parametrize("batch", [1, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_fused_step_equals_torch_step(model, task, batch, state):
    """The fused Triton step (3 launches per layer, CUDA graph) against the PyTorch step from the same prefilled
    states, 8 steps. fp32: equal to rounding. bf16: both are compared with an fp32 copy of the same weights, and the
    fused step must be no less accurate than the PyTorch step (bf16 rounding alone moves random-weight logits ~1e-2);
    with `state="model"` both keep the SSM state in bf16 (the gold copy in float32)."""
    import copy

    if state == "model" and strict(model):
        pytest.skip("a float32 model's state is float32 either way")
    use_kernels(True)
    config = model.config
    gold_model = model if strict(model) else copy.deepcopy(model).float()
    config.ssm_state_dtype = state
    try:
        _compare_fused_step(model, gold_model, task, batch, state)
    finally:
        config.ssm_state_dtype = "float32"


def _compare_fused_step(model, gold_model, task, batch, state):
    from transformers import DynamicCache

    from omnimamba_hf.modeling.graph_decode_omnimamba import OmniMambaGraphDecoder

    config = model.config
    g = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(0, 50000, (batch, 40), device="cuda", generator=g)
    decoders = {}
    runs = [("torch", model, "inductor"), ("fused", model, "fused"), ("gold", gold_model, "inductor")]
    if batch >= 16:  # the large-batch backend: cuBLAS projections around the package's conv + SSM kernel
        runs.append(("hybrid", model, "hybrid"))
    for name, m, backend in runs:
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        with torch.no_grad():
            m(input_ids=prompt, task=task, cache=cache, use_cache=True)
        graph = backend in ("fused", "hybrid")
        decoders[name] = OmniMambaGraphDecoder(m, task, batch, compile=False, use_graph=graph, backend=backend)
        decoders[name].load_state(cache)
    expected = torch.bfloat16 if state == "model" and not strict(model) else torch.float32
    assert decoders["torch"].ssm.dtype == decoders["fused"].ssm.dtype == expected
    auto = OmniMambaGraphDecoder(model, task, batch).backend  # what generate() picks (bf16: tensor cores to 16)
    large = "hybrid" if expected == torch.bfloat16 else "kernels"
    assert auto == ("fused" if batch <= (3 if strict(model) else 16) else large), auto
    tested = [name for name in ("fused", "hybrid") if name in decoders]
    errs = {name: [] for name in ["torch"] + tested}
    for step in range(8):
        ids = torch.randint(0, 16000, (batch,), device="cuda", generator=g) + (config.text_vocab_size if task == "t2i" else 0)
        out = {name: d.step(ids, 40 + step).clone() for name, d in decoders.items()}
        ref = decoders["gold"] if not strict(model) else decoders["torch"]
        ref_logits = out["gold"] if not strict(model) else out["torch"]
        for name in ["torch"] + tested if not strict(model) else tested:
            d = decoders[name]
            errs[name].append((rel_err(out[name], ref_logits), rel_err(d.ssm, ref.ssm), rel_err(d.conv, ref.conv)))
    worst = {k: [max(e[i] for e in v) for i in range(3)] for k, v in errs.items() if v}
    for name, w in worst.items():
        against = "fp32 copy" if not strict(model) else "PyTorch step"
        print(f"\n[{model.dtype}, {state} state] {task} batch {batch}: {name} step vs {against} over 8 steps, "
              f"rel. error logits {w[0]:.2e}, ssm state {w[1]:.2e}, conv state {w[2]:.2e}")  # fmt: skip
    for name in tested:
        if strict(model):
            assert max(worst[name]) < 1e-5, (name, worst)
        else:
            for i in range(3):
                assert worst[name][i] < 1.5 * worst["torch"][i] + 1e-3, (name, worst, i)


@pytest.mark.parametrize("case", ["t2i", "mmu", "mmu-padded-batch", "mmu-remainder-1", "mmu-remainder-2", "mmu-remainder-3"])
def test_graph_prefill_equals_eager_prefill(model, case):
    """The CUDA-graph prefill (vision graph + power-of-two chunk graphs, kernel-fused blocks for unpadded chunks)
    against the eager one-shot prefill: last logits and every layer's final states."""
    from transformers import DynamicCache

    use_kernels(True)
    config = model.config
    t2i, mmu, pixels = prompts(config, model.dtype)
    task = "t2i" if case == "t2i" else "mmu"
    ids, px, mask, positions = (t2i, None, None, None) if task == "t2i" else (mmu, pixels, None, None)
    if case.startswith("mmu-remainder-"):  # a last chunk shorter than the conv window: 512 + 256 + 1..3 positions
        ids = mmu[:, : 768 + int(case[-1])]
    if case == "mmu-padded-batch":
        short = torch.cat([torch.full((1, 5), config.pad_token_id, device="cuda"), mmu[:, :-5]], dim=1)
        ids, px = torch.cat([short, mmu]), torch.cat([pixels, pixels])
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        eager = model(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=positions, task=task,
                      cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
        model.reset_graph_decoders()
        graph, graph_cache = model._omnimamba_prefill(ids, task, "cuda_graph", px, attention_mask=mask, position_ids=positions)
        again, _ = model._omnimamba_prefill(ids, task, "cuda_graph", px, attention_mask=mask, position_ids=positions)
    state_err = max(
        max(rel_err(a.conv_states[0], b.conv_states[0]), rel_err(a.recurrent_states[0], b.recurrent_states[0]))
        for a, b in zip(graph_cache.layers, cache.layers)
    )
    err = rel_err(graph, eager)
    print(f"\n[{model.dtype}] {case}: graph prefill vs eager, rel. error logits {err:.2e}, states {state_err:.2e}")
    tol = 2e-3 if strict(model) else 5e-2  # fp32: TF32 dots inside the scan kernels, chunked vs one-shot
    assert err < tol and state_err < tol
    assert torch.equal(graph, again)  # replays are deterministic and the states are reset between prompts


def test_cuda_graph_generate_without_mamba_kernels(model):
    """Without mamba-ssm / causal-conv1d (simulated: OMNIMAMBA_DISABLE_KERNELS=1) generate() on CUDA still captures
    its graphs: the prefill chunks run the pure-PyTorch blocks, the decoder the fused Triton step (Triton only)."""
    from omnimamba_hf.modeling.graph_decode_omnimamba import mamba_kernels_for_decode

    t2i, _, _ = prompts(model.config, model.dtype)
    use_kernels(False)
    mamba_kernels_for_decode.cache_clear()
    model.reset_graph_decoders()
    try:
        eager = model.generate(t2i, generation_mode="image", decoder="eager", return_dict_in_generate=True, output_logits=True)
        graph = model.generate(t2i, generation_mode="image", decoder="cuda_graph", return_dict_in_generate=True, output_logits=True)
        assert model.graph_decoder("t2i", 1).backend == "fused"
        assert model.graph_prefill("t2i", 1)._kernels is None
    finally:
        use_kernels(True)
        mamba_kernels_for_decode.cache_clear()
        model.reset_graph_decoders()
    err = rel_err(graph.logits[0], eager.logits[0])
    same = int((graph.sequences != eager.sequences).long().cumsum(-1).eq(0).sum())
    print(f"\n[{model.dtype}] no mamba kernels: graph vs eager first logits rel. error {err:.2e}; {same} identical tokens")
    assert err < (1e-4 if strict(model) else 5e-2)
    if strict(model):
        assert torch.equal(graph.sequences, eager.sequences)


def test_recapture_after_reset_graph_decoders(model):
    """Decoders and prefill graphs sit in reference cycles with the model; after `reset_graph_decoders()` their
    graphs are released at once, and no garbage collection may run inside a later capture (it once invalidated a
    batch-8 capture that followed a dropped decoder). Several drop / re-capture rounds, both backends."""
    import gc

    t2i, _, _ = prompts(model.config, model.dtype)
    tok = torch.full((8,), model.config.text_vocab_size + 1, device="cuda")
    for round_ in range(3):
        for backend in ("fused", "kernels"):
            model.graph_decoder("t2i", 8, backend=backend).step(tok, 80)
            model.generate(t2i, generation_mode="image", decoder="cuda_graph")
            model.reset_graph_decoders()
            if round_ == 1:
                gc.collect()
    torch.cuda.synchronize()


def greedy_on_both_paths(model, mmu: dict, t2i_ids, batches, **text_kwargs):
    """Greedy MMU and T2I generation on the PyTorch path (eager, kernels off) and on three kernel paths (`generate`
    on CUDA graphs): "kernels" with the backends "auto" picks (the fused Triton step: CUDA-core GEMVs up to batch 3,
    tensor-core GEMMs beyond, in bf16), "mamba" with the fused step only up to batch 3 and mamba-ssm + cuBLAS beyond
    (what "auto" picks past 16 rows with a float32 state) and "hybrid" with the hybrid backend beyond batch 3 (what
    "auto" picks past 16 rows with a bf16 state), for the first `batch` rows of each batch size. Returns `{(path, batch): (text sequences, text logits [B, steps, V], image sequences, image logits)}` and
    the backends the graph decoders ran with (`{(path, task, batch): backend}`)."""
    import time

    from omnimamba_hf.modeling import graph_decode_omnimamba as G

    runs, backends, limit, large = {}, {}, G.FUSED_MAX_BATCH_TENSOR_CORES, G.LARGE_BATCH_BACKEND
    paths = (("torch", False, "eager"), ("kernels", True, "cuda_graph"), ("mamba", True, "cuda_graph"),
             ("hybrid", True, "cuda_graph"))  # fmt: skip
    for path, kernels, decoder in paths:
        use_kernels(kernels)
        model.reset_graph_decoders()
        G.FUSED_MAX_BATCH_TENSOR_CORES = G.FUSED_MAX_BATCH if path in ("mamba", "hybrid") else limit
        G.LARGE_BATCH_BACKEND = {"mamba": {}, "hybrid": {model.dtype: "hybrid", torch.float32: "hybrid"}}.get(path, large)
        try:
            for batch in batches:
                t0 = time.time()
                with torch.no_grad():
                    text = model.generate(**{k: v[:batch] for k, v in mmu.items()}, do_sample=False, decoder=decoder,
                                          return_dict_in_generate=True, output_logits=True, **text_kwargs)  # fmt: skip
                    image = model.generate(t2i_ids[:batch], generation_mode="image", do_sample=False, decoder=decoder,
                                           return_dict_in_generate=True, output_logits=True)  # fmt: skip
                torch.cuda.synchronize()
                runs[path, batch] = (text.sequences, torch.stack(text.logits, 1), image.sequences,
                                     torch.stack(image.logits, 1))  # fmt: skip
                print(f"  {path} path, batch {batch}: {time.time() - t0:.1f} s")
        finally:
            G.FUSED_MAX_BATCH_TENSOR_CORES, G.LARGE_BATCH_BACKEND = limit, large
        decoders = model.__dict__.get("_omnimamba_graph_decoders", {})
        backends.update({(path, k[0], k[1]): d.backend for k, d in decoders.items()})
    use_kernels(True)
    model.reset_graph_decoders()
    return runs, backends


TRAINED = os.environ.get("OMNIMAMBA_TRAINED_MODEL", os.path.expanduser("~/.cache/omnimamba-hf/demo/model"))


@pytest.mark.skipif(not os.path.isdir(TRAINED), reason="needs a trained checkpoint: run `omnimamba-hf demo` first or "
                    "set OMNIMAMBA_TRAINED_MODEL")  # fmt: skip
def test_trained_model_bf16_kernel_path_equals_torch_path():
    """Issue #8's bf16 bar on trained weights (random 1.3B weights have near-tied logits, docs/BENCHMARKS.md): the
    demo's trained model (`omnimamba-hf demo`, or OMNIMAMBA_TRAINED_MODEL) in bf16, kernel path (`generate` on CUDA
    graphs: graph prefill + fused Triton step (tensor cores at batch 10), and again with mamba-ssm kernels + cuBLAS at
    batch 10) vs PyTorch path (eager, kernels off): greedy MMU
    continuations for ten digit images (28 tokens: all that the demo's 56-row position table leaves, not the issue's
    64) and greedy T2I codes (16 per image) for ten captions are identical, and the per-step logits differ by < 1e-2
    (relative). The images are the model's own fp32 T2I outputs, so no dataset is needed on the device. Again with
    the SSM state in bf16 (`ssm_state_dtype="model"`): T2I identical, MMU logits < 1e-2 while the inputs are equal,
    and a token may differ only at a tie within 2 bf16 steps (see below)."""
    import PIL.Image

    from omnimamba_hf.processing import OmniMambaProcessor
    from omnimamba_hf.demo import data as D

    processor = OmniMambaProcessor.from_pretrained(TRAINED)
    fp32 = OmniMambaForConditionalGeneration.from_pretrained(TRAINED, dtype=torch.float32).cuda().eval()
    captions = [D.caption_for(k) for k in range(10)]
    t2i = processor(text=captions, generation_mode="image", return_tensors="pt").to("cuda")
    use_kernels(False)
    with torch.no_grad():
        codes = fp32.generate(t2i["input_ids"], generation_mode="image", do_sample=False, decoder="eager")
        size = fp32.config.vision_config.image_size
        images = [im.convert("L").resize((size, size), PIL.Image.BICUBIC).convert("RGB")
                  for im in processor.postprocess(fp32.decode_image_tokens(codes))]  # fmt: skip
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": D.QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    mmu = processor(images=images, text=[prompt] * len(images), return_tensors="pt").to("cuda")
    model = fp32.to(torch.bfloat16)
    never = model.config.text_vocab_size - 1  # an unused text row (spec §8 #1) as EOS: as long as the table allows
    n = len(images)
    start = mmu["input_ids"].shape[1]
    for state in ("float32", "model"):  # the SSM state in float32, then in bf16 as the original keeps it
        model.config.ssm_state_dtype = state
        runs, backends = greedy_on_both_paths(model, dict(mmu), t2i["input_ids"], (n,), eos_token_id=never)
        assert backends[("kernels", "mmu", n)] == "fused" and backends[("mamba", "mmu", n)] == "kernels"
        assert backends[("hybrid", "mmu", n)] == "hybrid"
        ts, tl, its, il = runs["torch", n]
        new = ts.shape[1] - start
        assert new >= 16  # the demo's 56-row MMU position table leaves 28 after the prompt
        answers = processor.batch_decode(ts[:, start:][:, :4], skip_special_tokens=True)
        for path in ("kernels", "mamba", "hybrid"):
            ks, kl, iks, ikl = runs[path, n]
            errs = (rel_err(kl, tl), rel_err(ikl, il))
            diverged, prefix_err, margins = common_prefix(ts[:, start:], tl, ks[:, start:], kl)
            print(f"\n[trained demo model, bf16, {state} state] {path} path ({backends[(path, 'mmu', n)]}) vs PyTorch "
                  f"path: MMU {new} new tokens x {len(images)}, identical {bool(torch.equal(ts, ks))} (first differing "
                  f"token per row {diverged}; PyTorch path's top-2 logit margin there, in bf16 steps: {margins}; "
                  f"logits rel. error "
                  f"up to it {prefix_err:.2e}), logits rel. error {errs[0]:.2e}; T2I {il.shape[1]} codes x "
                  f"{len(captions)}, identical {bool(torch.equal(its, iks))}, logits rel. error {errs[1]:.2e}; "
                  f"answers {answers}")  # fmt: skip
            assert torch.equal(its, iks) and errs[1] < 1e-2
            if state == "float32":  # the bar
                assert torch.equal(ts, ks) and errs[0] < 1e-2
            else:
                # A bf16 state rounds every update to 8 bits, so the paths' float32 differences (~1e-6) become 1-ulp
                # bf16 differences; on this tiny model one of ten continuations then flips after its answer, where
                # the PyTorch path's two best logits are adjacent bf16 values (both kernel paths alike; the 1.3B test
                # below stays identical). Bar: the logits agree within 1e-2 wherever the inputs are equal (up to
                # and including a first differing token); tokens differ only where the best two are <= 2 bf16 steps
                # apart.
                assert prefix_err < 1e-2 and all(m <= 2.0 for m in margins)


def common_prefix(ref_tokens, ref_logits, tokens, logits):
    """Per row, the first generated token at which `tokens` differs from `ref_tokens` (None if none); the relative
    logits error over the steps whose inputs are still equal (up to and including that token's step); the reference's
    top-2 logit margin at each first differing token, in bf16 steps at that logit (1.0: two adjacent bf16 values)."""
    diverged, margins, a, b = [], [], [], []
    for row in range(ref_tokens.shape[0]):
        diff = (ref_tokens[row] != tokens[row]).nonzero()
        k = int(diff[0]) if len(diff) else None
        diverged.append(k)
        stop = ref_tokens.shape[1] if k is None else k + 1
        a.append(logits[row, :stop])
        b.append(ref_logits[row, :stop])
        if k is not None:  # in units of the bf16 spacing at the top logit (1 = adjacent bf16 values)
            top = ref_logits[row, k].float().topk(2).values
            ulp = 2.0 ** (torch.floor(torch.log2(top[0].abs())).item() - 7)
            margins.append(round(float(top[0] - top[1]) / ulp, 2))
    return diverged, rel_err(torch.cat(a), torch.cat(b)), margins


class CycleTask:
    """Synthetic data for a quick fine-tune of the full 1.3B layout: every answer walks a fixed random cycle of 64 ids
    (text ids for MMU, image codes for T2I) from one of 4 starts, named by a key token near the end of the prompt.
    A model trained on it is confident at every step — no near-tied logits, unlike random weights — so "greedy tokens
    identical" is a fair bar for two bf16 implementations. (With 64 starts the key → first-token map took hundreds of
    steps to learn while the walk itself was learned in ~60: the first token stayed a near-tie.)"""

    CYCLE, STARTS = 64, 4

    def __init__(self, config, generator):
        ids = torch.randperm(49000, generator=generator)[: self.CYCLE + self.STARTS] + 1000  # clear of special rows
        self.text, self.keys = ids[: self.CYCLE], ids[self.CYCLE :]
        self.codes = torch.randperm(config.image_vocab_size, generator=generator)[: self.CYCLE]
        self.config = config

    def starts(self, batch, generator):
        """(key index, cycle position) of each row's start; a batch of >= STARTS rows holds every key (a training
        batch predicted without error then shows every key learned: with random keys a T2I start once went unlearned
        and the test stopped training too early)."""
        key = torch.randperm(self.STARTS, generator=generator)[torch.arange(batch) % self.STARTS]
        return key, key * (self.CYCLE // self.STARTS)

    def walk(self, symbols, start, length):
        return symbols[(start[:, None] + torch.arange(length)) % self.CYCLE]

    def mmu(self, batch, generator, answer=64):
        """(prompt ids, expected answer ids, pixel values): `[MMU][SOI] image slots [EOI][SOT] question key`."""
        c = self.config
        key, start = self.starts(batch, generator)
        head = [c.mmu_token_id, c.soi_token_id] + [c.image_token_id] * c.num_image_tokens + [c.eoi_token_id, c.sot_token_id]
        question = torch.randint(1000, 50000, (batch, 8), generator=generator)
        prompt = torch.cat([torch.tensor(head).expand(batch, -1), question, self.keys[key][:, None]], 1)
        size = c.vision_config.image_size
        pixels = torch.randn(batch, 2, 3, size, size, generator=generator)
        return prompt, self.walk(self.text, start, answer), pixels

    def t2i(self, batch, generator):
        """(prompt ids, expected image ids): `[T2I][SOT] caption (ending in the key) [EOT][SOI]`, 256 image ids."""
        c = self.config
        key, start = self.starts(batch, generator)
        caption = torch.randint(1000, 50000, (batch, c.t2i_caption_length), generator=generator)
        caption[:, -1] = self.keys[key]
        edge = lambda *ids: torch.tensor(ids).expand(batch, -1)  # noqa: E731
        prompt = torch.cat([edge(c.t2i_token_id, c.sot_token_id), caption, edge(c.eot_token_id, c.soi_token_id)], 1)
        return prompt, self.walk(self.codes, start, c.num_generated_image_tokens) + c.text_vocab_size


def train_on_cycles(model, task, max_steps, generator):
    """Full fine-tune (vision towers, projector and VQ frozen) in float32 with TF32 matmuls, MMU and T2I batches
    alternating, until the last two batches of each task were predicted without a single error (first token from the
    key included: the loss alone cannot tell, its share of a 256-code image is 1/256) at a loss below 0.01, or
    `max_steps`; returns (steps, last MMU loss, last T2I loss)."""
    frozen = ("model.vision_model.", "model.projector.", "model.vqmodel.")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    model.train()
    last = {"mmu": (float("inf"), 0.0), "t2i": (float("inf"), 0.0)}  # (loss, token accuracy)
    streak = {"mmu": 0, "t2i": 0}  # consecutive batches predicted without error
    try:
        for step in range(max_steps):
            for group in opt.param_groups:
                group["lr"] = 1e-4 * min(1.0, (step + 1) / 10)
            name = ("mmu", "t2i")[step % 2]
            if name == "mmu":
                prompt, answer, pixels = task.mmu(4, generator)
                kw = dict(pixel_values=pixels.to(model.device))
            else:
                (prompt, answer), kw = task.t2i(8, generator), {}
            ids = torch.cat([prompt, answer], 1).to(model.device)
            labels = ids.clone()
            labels[:, : prompt.shape[1]] = -100
            out = model(input_ids=ids, labels=labels, task=name, use_cache=False, logits_to_keep=answer.shape[1] + 1, **kw)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            offset = model.config.text_vocab_size if name == "t2i" else 0
            accuracy = (out.logits[:, :-1].argmax(-1).cpu() + offset == answer).float().mean().item()
            last[name] = (out.loss.item(), accuracy)
            streak[name] = streak[name] + 1 if out.loss.item() < 0.01 and accuracy == 1.0 else 0
            done = min(streak.values()) >= 2
            if step % 20 == 0 or done:
                print(f"  step {step:3d}: mmu loss {last['mmu'][0]:.4f} accuracy {last['mmu'][1]:.3f}, "
                      f"t2i loss {last['t2i'][0]:.4f} accuracy {last['t2i'][1]:.3f}", flush=True)  # fmt: skip
            if done:
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        model.eval()
        model.requires_grad_(False)
        del opt
    return step + 1, last["mmu"][0], last["t2i"][0]


@pytest.mark.skipif(os.environ.get("OMNIMAMBA_GPU_FULL_SIZE", "1") == "0", reason="OMNIMAMBA_GPU_FULL_SIZE=0")
def test_trained_full_size_bf16_kernel_path_equals_torch_path():
    """Issue #8's bf16 bar at the released 1.3B layout (48 layers) with trained weights, as far as they can be had
    offline: the model is fine-tuned here, in a few minutes, on `CycleTask`, then cast to bf16. Kernel path (`generate`
    on CUDA graphs: graph prefill, fused Triton step at batch 1 and, on tensor cores, at batch 4; again with mamba-ssm
    kernels + cuBLAS at batch 4) vs PyTorch path (eager,
    kernels off): greedy 64-token MMU continuations and 256-code T2I continuations identical, per-step logits within
    1e-2 (relative), batch 4 == batch 1 row by row; the model really is trained (its answers follow the cycle). All of
    it with the SSM state in float32 and again in bf16 (`ssm_state_dtype="model"`)."""
    import time

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = OmniMambaConfig()
    assert config.text_config.num_hidden_layers == 48 and config.text_config.hidden_size == 2048
    use_kernels(True)
    with torch.device("cuda"):
        model = OmniMambaForConditionalGeneration(config)
    task = CycleTask(config, g)
    t0 = time.time()
    steps, mmu_loss, t2i_loss = train_on_cycles(model, task, int(os.environ.get("OMNIMAMBA_FULL_SIZE_STEPS", "300")), g)
    print(f"\n[1.3B trained here] {steps} steps in {time.time() - t0:.0f} s: loss mmu {mmu_loss:.4f}, t2i {t2i_loss:.4f}")
    torch.cuda.empty_cache()
    model.to(torch.bfloat16)
    mmu_prompt, mmu_answer, pixels = task.mmu(4, g)
    mmu = dict(input_ids=mmu_prompt.cuda(), pixel_values=pixels.cuda().to(torch.bfloat16))
    t2i_prompt, t2i_answer = task.t2i(4, g)
    never = config.text_vocab_size - 1  # the image placeholder row: never generated, so all 64 tokens come
    torch_path = {}
    for state in ("float32", "model"):  # the SSM state in float32, then in bf16 as the original keeps it
        model.config.ssm_state_dtype = state
        torch_path[state] = compare_trained_paths(model, mmu, mmu_prompt, mmu_answer, t2i_prompt, t2i_answer, never, state)
    model.config.ssm_state_dtype = "float32"
    (a, al, ai, ail), (b, bl, bi, bil) = torch_path["float32"], torch_path["model"]
    print(f"[1.3B trained here, bf16] PyTorch path, bf16 state vs float32 state, batch 4: MMU tokens identical "
          f"{bool(torch.equal(a, b))}, logits rel. error {rel_err(bl, al):.2e}; T2I codes identical "
          f"{bool(torch.equal(ai, bi))}, logits rel. error {rel_err(bil, ail):.2e}")  # fmt: skip


def compare_trained_paths(model, mmu, mmu_prompt, mmu_answer, t2i_prompt, t2i_answer, never, state):
    config = model.config
    runs, backends = greedy_on_both_paths(model, mmu, t2i_prompt.cuda(), (4, 1), max_new_tokens=64, eos_token_id=never)
    runs = {key: (text[:, mmu_prompt.shape[1] :], *rest) for key, (text, *rest) in runs.items()}  # the answers only
    # the graph decoders really ran, with the backends "auto" picks (and, on the "mamba" path, past its limit)
    for task_ in ("mmu", "t2i"):
        assert backends[("kernels", task_, 4)] == "fused" and backends[("mamba", task_, 4)] == "kernels"
        assert backends[("hybrid", task_, 4)] == "hybrid"
        assert backends[("kernels", task_, 1)] == backends[("mamba", task_, 1)] == backends[("hybrid", task_, 1)] == "fused"
    tt, tl, ti, til = runs["torch", 4]
    learned = ((tt.cpu() == mmu_answer).float().mean().item(), (ti.cpu() == t2i_answer).float().mean().item())
    # (fraction of tokens on the expected walk: the start from the key, then the cycle)
    assert min(learned) > 0.95, "the fine-tune did not converge: the comparison would be on near-tied logits"
    assert tt.shape[1] == 64 and ti.shape[1] == config.num_generated_image_tokens
    single_errs = (rel_err(runs["kernels", 1][1], runs["torch", 1][1]), rel_err(runs["kernels", 1][3], runs["torch", 1][3]))
    for path, label in (("kernels", "fused step, tensor cores"), ("mamba", "mamba-ssm kernels + cuBLAS"),
                        ("hybrid", "cuBLAS + conv/SSM kernel")):  # fmt: skip
        kt, kl, ki, kil = runs[path, 4]
        errs = (rel_err(kl, tl), rel_err(kil, til))
        print(f"[1.3B trained here, bf16, {state} state] kernel path ({label}) vs PyTorch path, batch 4: MMU "
              f"{tt.shape[1]} tokens identical {bool(torch.equal(tt, kt))}, logits rel. error {errs[0]:.2e}; T2I {ti.shape[1]} codes "
              f"identical {bool(torch.equal(ti, ki))}, logits rel. error {errs[1]:.2e}; batch 1 (fused step): logits "
              f"rel. error {single_errs[0]:.2e} / {single_errs[1]:.2e}; answers follow the cycle: MMU "
              f"{learned[0]:.3f}, T2I {learned[1]:.3f}")  # fmt: skip
        assert torch.equal(tt, kt) and torch.equal(ti, ki)
        assert max(errs + single_errs) < 1e-2
    for path in ("torch", "kernels", "mamba", "hybrid"):  # batch 1 == row 0 of batch 4, on each path
        assert torch.equal(runs[path, 1][0], runs[path, 4][0][:1]) and torch.equal(runs[path, 1][2], runs[path, 4][2][:1])
    return runs["torch", 4]
