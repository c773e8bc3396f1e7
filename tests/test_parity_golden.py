"""Parity with the ORIGINAL OmniMamba, forever after (issue #9): golden references recorded from the original code.

`tests/fixtures/parity_tiny/` holds what `tests/parity/run_original_parity.py --size tiny` recorded on the GPU by running
the original implementation (hustvl/OmniMamba b372978, with mamba-ssm kernels, timm towers, LlamaGen VQ) at a tiny
configuration with fixed-seed random weights: the original-layout state dict (fp16 values, as the released
checkpoint), the inputs (token ids in the original's layouts, the original's preprocessed pixels, raw images, VQ codes
and images) and the original's float32 outputs (TF32 off, Triton dots in IEEE fp32).

Here, on CPU: the committed original-layout weights are converted with the project's converter, the port is run on
the same inputs through the code shared with the harness (`parity.golden`), and every quantity is compared:
float32 logits / losses / features / pixels within max|Δ| <= 1e-4 x max(1, max|original|), greedy sequences (MMU with
image, MMU text-only, 256-token T2I) identical, VQ codes identical, processor ids identical, preprocessing within 1e-5.
Negative controls show that the comparison does fail on a wrong port.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from parity import golden

FIX = golden.FIXTURE_DIR
FLOAT_QUANTITIES = [n for n, k in golden.QUANTITIES.items() if k == "float" and n not in golden.DECODER_QUANTITIES]
DECODERS = ("eager", "static")


@pytest.fixture(scope="module")
def fixture():
    return golden.load_fixture(FIX)


@pytest.fixture(scope="module")
def base_tokenizer(fixture):
    return golden.base_tokenizer_from_file(fixture["tokenizer_file"])


@pytest.fixture(scope="module")
def port(fixture, base_tokenizer):
    weights = {k: v.float() for k, v in fixture["weights"].items()}
    # the original module also holds LlamaGen's training-only usage buffer (not stored in the fixture: zeros)
    weights["llm_backbone.vqvae.quantize.codebook_used"] = torch.zeros(65536)
    model = golden.convert_original(weights, base_tokenizer, fixture["meta"]["conversion"], torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def processor(port, base_tokenizer, fixture):
    from omnimamba_hf.processing import OmniMambaImageProcessor, OmniMambaProcessor
    from omnimamba_hf.processing.tokenization_omnimamba import build_omnimamba_tokenizer

    size = fixture["meta"]["sizes"]["image_size"]
    return OmniMambaProcessor.from_config(
        port.config, build_omnimamba_tokenizer(base_tokenizer), OmniMambaImageProcessor(size={"height": size, "width": size})
    )


@pytest.fixture(scope="module")
def forward_outputs(port, fixture):
    return golden.run_port_forward(port, fixture["inputs"])


@pytest.fixture(scope="module", params=DECODERS)
def generation(request, port, fixture):
    return request.param, golden.run_port_generation(
        port, fixture["inputs"], fixture["meta"]["mmu_new_tokens"], decoder=request.param
    )


def _check(row: golden.Row):
    assert row.ok, f"{row.quantity}: {row.detail}"


# ---- the fixture itself ----------------------------------------------------------------------------------------------


def test_fixture_is_a_recording_of_the_original_on_gpu(fixture):
    meta = fixture["meta"]
    assert meta["original_commit"] == "b372978"
    harness = meta["harness"]
    assert not harness["cpu_stubs"], "the fixture was recorded with the CPU stand-ins, not the original's GPU stack"
    assert harness["device"].startswith("cuda") and "mamba_ssm" in harness["versions"]
    assert "TRITON_F32_DEFAULT=ieee" in meta["numerics"]
    assert harness["fp32_all_ok"], "the port on the GPU disagreed with the original when the fixture was recorded"
    for name, digest in meta["sha256"].items():  # the files are the ones the harness wrote
        assert hashlib.sha256((FIX / name).read_bytes()).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in FIX.iterdir() if p.is_file())
    assert total < 2 * 2**20, f"fixture is {total} bytes"


def test_weights_are_the_original_layout(fixture):
    w = fixture["weights"]
    # a few keys of each sub-model, in the original's names (spec Appendix A/B), and the tied copies saved separately
    for key in ("vision_backbone.dino_featurizer.reg_token", "vision_backbone.siglip_featurizer.attn_pool.latent",
                "llm_backbone.vqvae.encoder.conv_blocks.0.res.0.conv1.weight",
                "llm_backbone.mamba.backbone.layers.1.mixer.in_proj.mmu_lora_B0.weight",
                "llm_backbone.mamba.backbone.mmu_pos_embed", "projector.projector.4.bias"):  # fmt: skip
        assert key in w, key
    assert torch.equal(w["llm_backbone.mamba.lm_head.weight"], w["llm_backbone.mamba.backbone.embedding.weight"])
    assert torch.equal(
        w["llm_backbone.mamba.img_head.weight"], w["llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight"]
    )
    assert w["llm_backbone.mamba.backbone.mmu_pos_embed"].shape[1] == 1500  # hard-coded in the original
    assert w["llm_backbone.mamba.backbone.pos_embed"].shape[1] == 68 + 4 + 256 + 1


def test_fp32_greedy_paths_are_far_from_ties(fixture):
    """Greedy identity is meaningful only when the original's top-1/top-2 gaps exceed the fp32 noise (~1e-5 here)."""
    margins = fixture["meta"]["original_greedy_margins"]
    assert set(margins) == set(golden.GREEDY_PAIRS)
    assert min(margins.values()) > 1e-3, margins


# ---- the port against the original -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_QUANTITIES + ["vq_encode"])
def test_forward_quantities_match_the_original(name, forward_outputs, fixture):
    ref = fixture["outputs"][name]
    _check(golden.compare_one(name, ref, forward_outputs[name], kind=golden.QUANTITIES[name]))


def test_greedy_generation_matches_the_original(generation, fixture):
    decoder, got = generation
    ref = fixture["outputs"]
    eos = fixture["meta"]["eos_token_id"]
    names = [n for n in golden.DECODER_QUANTITIES]
    rows = golden.compare_outputs(ref, got, eos=eos, names=names)
    assert {r.quantity for r in rows} == set(names)
    bad = [r for r in rows if not r.ok]
    assert not bad, f"decoder={decoder}:\n" + golden.format_rows(bad)
    # identical means identical: the full 256-token T2I sequences and every MMU token
    assert torch.equal(got["t2i_greedy"], ref["t2i_greedy"])
    assert got["t2i_greedy"].shape[1] == 256


def test_processor_builds_the_original_layouts(processor, port, fixture):
    got = golden.port_ids(processor, fixture["meta"]["texts"])
    _check(golden.compare_one("ids_mmu", fixture["outputs"]["ids_mmu"], got["ids_mmu"]))
    _check(golden.compare_one("ids_t2i", fixture["outputs"]["ids_t2i"], got["ids_t2i"]))
    # and the original MMU layout is the port layout minus the image slots
    ids = golden.port_mmu_ids(port.config, fixture["inputs"]["mmu_input_ids"])
    assert torch.equal(ids, fixture["outputs"]["ids_mmu"])


def test_image_preprocessing_matches_the_original_transform(processor, fixture):
    inputs = fixture["inputs"]
    ref = torch.stack([inputs["mmu_pixel_dino"], inputs["mmu_pixel_siglip"]], dim=1)
    _check(golden.compare_one("preprocess", ref, golden.port_preprocess(processor, inputs)))


# ---- the check can fail ----------------------------------------------------------------------------------------------


def _variant(port, edit):
    model = copy.deepcopy(port)
    with torch.no_grad():
        edit(model)
    return model.eval()


def test_a_wrong_adapter_fails_the_check(port, fixture):
    """Swapping the two task adapters (a plausible conversion bug) breaks the MMU logits."""

    def swap(model):
        for layer in model.model.language_model.layers:
            ad = layer.mixer.in_proj.task_adapters
            for part in ("down", "up"):
                a, b = getattr(ad["mmu"], part).weight, getattr(ad["t2i"], part).weight
                tmp = a.clone()
                a.copy_(b)
                b.copy_(tmp)

    got = golden.run_port_forward(_variant(port, swap), fixture["inputs"])
    row = golden.compare_one("mmu_logits", fixture["outputs"]["mmu_logits"], got["mmu_logits"])
    assert not row.ok, row.detail


def test_a_small_perturbation_fails_the_check(port, fixture):
    """A 1e-3 relative change of one T2I position row (late in the sequence) is caught by the logits rule."""

    def nudge(model):
        table = model.model.t2i_position_embeddings
        table[0, 300] += 1e-3 * table[0, 300].abs().max()

    got = golden.run_port_forward(_variant(port, nudge), fixture["inputs"])
    row = golden.compare_one("t2i_logits", fixture["outputs"]["t2i_logits"], got["t2i_logits"])
    assert not row.ok, row.detail
    ok = golden.compare_one("mmu_logits", fixture["outputs"]["mmu_logits"], got["mmu_logits"])
    assert ok.ok, ok.detail  # the MMU path does not read the T2I table


def test_a_diverging_greedy_sequence_fails_the_check(fixture):
    ref = fixture["outputs"]["t2i_greedy"]
    got = ref.clone()
    got[1, 200] = (got[1, 200] + 1) % 64
    row = golden.compare_one("t2i_greedy", ref, got)
    assert not row.ok and "200" in row.detail
