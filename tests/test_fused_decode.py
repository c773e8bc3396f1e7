"""The fused Triton decode step (modeling/triton_decode_omnimamba.py, the "fused" graph-decoder backend) equals the
PyTorch decode step: logits and both recurrent states, both tasks, batch 1, 3 and 5 (the tensor-core path), over
several steps from states that an eager prefill produced, and with the SSM state kept in bf16. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported, hence the subprocess); on the GPU tests/gpu runs them compiled, in bf16 too. float32 only here: the
interpreter rounds to bfloat16 by truncation, not round-to-nearest as the GPU does."""

import json

import pytest
from common import run_in_triton_interpreter

pytest.importorskip("triton")


def test_fused_step_equals_torch_step_in_triton_interpreter():
    results = run_in_triton_interpreter(__file__)
    # tasks x batch sizes x steps, + bf16 state, + heads split over programs, + pipelined tiles, + after retraining
    # an adapter
    assert len(results) == 2 * 3 * 4 + 4 + 2 * 2 + 2 * 2 + 1
    for r in results:
        tolerance = 2e-2 if r["task"] == "t2i-bf16-state" else 1e-5  # bf16 rounding, truncated in the interpreter
        assert r["logits"] < tolerance and r["conv"] < tolerance and r["ssm"] < tolerance, r
        assert r["moved"] > 1e-3, r  # the states really changed, so the comparison is not vacuous
    first = next(r for r in results if r["task"] == "t2i-bf16-state")
    assert first["logits"] < 1e-5, first  # from equal states, y reads the float32 update: equal before any rounding


def main():
    import torch
    from transformers import DynamicCache

    from common import randomize_routing_, tiny_config
    from omnimamba_hf import OmniMambaForConditionalGeneration
    from omnimamba_hf.modeling import triton_decode_omnimamba
    from omnimamba_hf.modeling.graph_decode_omnimamba import OmniMambaGraphDecoder

    triton_decode_omnimamba.TENSOR_CORE_DTYPES = (torch.float32,)
    cpu = torch.device("cpu")
    assert triton_decode_omnimamba.launch_configs(5, torch.float32, cpu)["in_proj"]["tensor_cores"]
    assert "tensor_cores" not in triton_decode_omnimamba.launch_configs(3, torch.float32, cpu)["in_proj"]
    # in_proj's `one_row` settings apply at batch 1 only, and never reach the kernel as an argument
    one_row = triton_decode_omnimamba.LAUNCH["in_proj"]["one_row"]
    assert triton_decode_omnimamba.launch_configs(1, torch.float32, cpu)["in_proj"] == {
        **{k: v for k, v in triton_decode_omnimamba.LAUNCH["in_proj"].items() if k != "one_row"}, **one_row
    }
    for batch in (1, 2, 3, 5):
        assert "one_row" not in triton_decode_omnimamba.launch_configs(batch, torch.float32, cpu)["in_proj"]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    torch.manual_seed(0)
    config = tiny_config()
    model = randomize_routing_(OmniMambaForConditionalGeneration(config).eval(), seed=1, scale=0.3)
    V, results = config.text_vocab_size, []

    def prefilled_decoders(task, prompt):
        """(PyTorch-step decoder, fused decoder), both holding the states of an eager prefill of `prompt`."""
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        with torch.no_grad():
            model(input_ids=prompt, task=task, cache=cache, use_cache=True)
        pair = [OmniMambaGraphDecoder(model, task, prompt.shape[0], compile=False, use_graph=False, backend=backend,
                                      code_table=True)  # T2I embeds codes from the table, as on CUDA in bf16
                for backend in ("inductor", "fused")]  # fmt: skip
        assert pair[1].backend == "fused"
        for decoder in pair:
            decoder.load_state(cache)
        return pair

    for task in ("t2i", "mmu"):
        # 3: the batched CUDA-core GEMV (rows padded to 4 inside, one masked); 5: the tensor-core GEMM path (rows
        # padded to 16; bf16 on the GPU, run here in float32 with exact dots)
        for batch in (1, 3, 5):
            g = torch.Generator().manual_seed(batch)
            ref, fused = prefilled_decoders(task, torch.randint(0, 200, (batch, 6), generator=g))
            start = ref.ssm.clone()
            for step in range(4):
                ids = torch.randint(0, 50, (batch,), generator=g) + (V if task == "t2i" else 100)
                a, b = ref.step(ids, 6 + step).clone(), fused.step(ids, 6 + step).clone()
                results.append(dict(
                    task=task, batch=batch, step=step, logits=rel(b, a), conv=rel(fused.conv, ref.conv),
                    ssm=rel(fused.ssm, ref.ssm), moved=rel(ref.ssm, start) if step else 1.0,
                ))  # fmt: skip
    # the SSM state kept in bf16 (what config.ssm_state_dtype="model" gives a bf16 model): the kernel loads it, updates
    # it in float32 and stores it rounded. The interpreter rounds by truncation, the PyTorch step to nearest, so this
    # case is compared at bf16 accuracy (tests/gpu compares it compiled)
    ref, fused = prefilled_decoders("t2i", torch.randint(0, 200, (3, 6), generator=torch.Generator().manual_seed(5)))
    ref.ssm, fused.ssm = ref.ssm.bfloat16(), fused.ssm.bfloat16()
    start = ref.ssm.clone()
    for step in range(4):
        ids = torch.tensor([V + 1 + step, V + 9, V + 30 - step])
        a, b = ref.step(ids, 6 + step).clone(), fused.step(ids, 6 + step).clone()
        assert fused.ssm.dtype == torch.bfloat16
        results.append(dict(task="t2i-bf16-state", batch=3, step=step, logits=rel(b, a), conv=rel(fused.conv, ref.conv),
                            ssm=rel(fused.ssm, ref.ssm), moved=rel(ref.ssm, start) if step else 1.0))  # fmt: skip

    # head-dim rows split over several conv + SSM programs (the default block is a whole head; LAUNCH may set fewer):
    # each program's slice of the state, gate and partial sums of squares (read by the batch-5 tensor-core out_proj)
    whole_head = triton_decode_omnimamba.LAUNCH["ssm_block_p"]
    for batch in (1, 5):
        triton_decode_omnimamba.LAUNCH["ssm_block_p"] = config.text_config.head_dim // 4
        ref, fused = prefilled_decoders("t2i", torch.randint(0, 200, (batch, 6), generator=torch.Generator().manual_seed(9)))
        assert fused._gated_sumsq.shape[1] == 4 * config.text_config.num_heads
        start = ref.ssm.clone()
        for step in range(2):
            ids = torch.arange(batch) + V + 2 * step
            a, b = ref.step(ids, 6 + step).clone(), fused.step(ids, 6 + step).clone()
            results.append(dict(task="t2i-split-heads", batch=batch, step=step, logits=rel(b, a),
                                conv=rel(fused.conv, ref.conv), ssm=rel(fused.ssm, ref.ssm),
                                moved=rel(ref.ssm, start) if step else 1.0))  # fmt: skip
    triton_decode_omnimamba.LAUNCH["ssm_block_p"] = whole_head

    # batch 1 with `stages` > 1: a GEMV's first weight tile from registers, the rest in a pipelined loop (here with
    # tiles narrower than K, so that the loop runs: in_proj K = 32, out_proj K = 64)
    launch = {k: triton_decode_omnimamba.LAUNCH[k] for k in ("in_proj", "out_proj", "head")}
    for name in launch:
        triton_decode_omnimamba.LAUNCH[name] = dict(block_n=4, block_k=8, num_warps=4, stages=3)
    for task in ("t2i", "mmu"):
        ref, fused = prefilled_decoders(task, torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(3)))
        start = ref.ssm.clone()
        for step in range(2):
            ids = torch.tensor([(V if task == "t2i" else 100) + 7 * step + 2])
            a, b = ref.step(ids, 6 + step).clone(), fused.step(ids, 6 + step).clone()
            results.append(dict(task=f"{task}-pipelined-tiles", batch=1, step=step, logits=rel(b, a),
                                conv=rel(fused.conv, ref.conv), ssm=rel(fused.ssm, ref.ssm),
                                moved=rel(ref.ssm, start) if step else 1.0))  # fmt: skip
    triton_decode_omnimamba.LAUNCH.update(launch)

    # weights changed after the fused buffers were built, through `.data` (no `_version` bump): the fused step follows
    for layer in model.model.language_model.layers:
        layer.mixer.in_proj.task_adapters["t2i"].down.weight.data.mul_(-2.0)
        layer.mixer.A_log.data.add_(0.5)
    ref, fused = prefilled_decoders("t2i", torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(7)))
    ids = torch.tensor([V + 3])
    results.append(dict(task="t2i-retrained", batch=1, step=0, logits=rel(fused.step(ids, 6), ref.step(ids, 6)),
                        conv=rel(fused.conv, ref.conv), ssm=rel(fused.ssm, ref.ssm), moved=1.0))  # fmt: skip

    import copy

    copied = copy.deepcopy(model)  # the model still deep-copies with fused decoders built (graph caches left behind)
    assert "_omnimamba_fused_in_proj" not in copied.__dict__
    print(json.dumps(results))


if __name__ == "__main__":
    main()
