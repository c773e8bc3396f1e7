"""Conversion of the original release onto the Hub layout (issue #5), CPU and offline.

A tiny random OmniMamba is written in the exact original layout (key names from the spec's key table, the JSON
fixture; LM + projector in an fp16 `.pth` with separately saved tied copies; timm towers as separate files, DINOv2 at
a larger native grid; SigLIP as an open_clip checkpoint; LlamaGen's `{"model": ...}` VQ), converted through the
command line, loaded with the Auto classes, and compared with `conversion.reference` (the original formulae on the
original-layout weights), which is itself cross-checked against the independent references of `test_vision.py` and
`test_vq.py`. The full 1.3B key table is converted on the meta device. Every refusal names the keys and leaves nothing
behind.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from common import make_base_tokenizer, tiny_config
from reference_original import (
    DINO,
    LM,
    SIGLIP,
    VQ,
    Dims,
    key_table,
    original_shapes,
    random_original_state_dict,
    ref_decode_code,
    ref_dino,
    ref_siglip,
    split,
    with_vq,
    write_original_release,
)

import omnimamba_hf  # noqa: F401 - registers the Auto classes
from omnimamba_hf.conversion import reference
from omnimamba_hf.conversion.convert_omnimamba_weights_to_hf import (
    DELEGATES,
    ORIGINAL_TO_HF,
    Delegate,
    Tied,
    atomic_output_dir,
    convert_omnimamba_checkpoint,
    convert_state_dict,
    gather_original_weights,
    hf_key_to_original,
    infer_config_from_state_dict,
    main,
    map_original_key,
    target_key_shapes,
    _empty_model,
)
from omnimamba_hf.conversion.vision_towers import resample_dino_pos_embed
from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaConfig, OmniMambaVQVAEConfig

TINY_FLAGS = ["--t2i-caption-length", "6", "--dino-heads", "2", "--siglip-heads", "2", "--quiet", "--no-hash"]
TINY_KWARGS = dict(t2i_caption_length=6, dino_num_attention_heads=2, siglip_num_attention_heads=2, progress=False)
NATIVE_DINO_GRID = 3  # the tiny stand-in for DINOv2's native 37×37 table (resampled to the 2×2 grid)


# ---- the tiny original release ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_config()


@pytest.fixture(scope="module")
def original(tiny):
    """Canonical full original layout (fp32 values; LM values fp16-representable as in the release) and its parts."""
    d = Dims.from_config(tiny)
    sd = with_vq(random_original_state_dict(original_shapes(d), seed=0), tiny.vq_config, seed=1)
    for k in list(sd):  # the release stores the LM + projector in fp16: use fp16-representable values throughout
        if k.startswith((LM, "projector.")):
            sd[k] = sd[k].half().float()
    sd[f"{LM}lm_head.weight"] = sd[f"{LM}backbone.embedding.weight"]
    sd[f"{LM}img_head.weight"] = sd[f"{LM}backbone.img_embeddings.word_embeddings.weight"]
    native = 0.5 * torch.randn(1, NATIVE_DINO_GRID**2, d.dino_width, generator=torch.Generator().manual_seed(5))
    parts = split(sd)
    parts["dino"]["pos_embed"] = native  # as published by timm (518 px), resampled at load time
    sd[DINO + "pos_embed"] = resample_dino_pos_embed(native, d.grid)  # what the original module holds
    return {"full": sd, **parts}


@pytest.fixture(scope="module")
def release(tmp_path_factory, original):
    root = tmp_path_factory.mktemp("release")
    return write_original_release(
        root, original["lm"], original["dino"], original["siglip"], original["vq"], make_base_tokenizer()
    )


def _cli(paths, output, *extra):
    args = ["--checkpoint", str(paths["checkpoint"]), "--tokenizer", str(paths["tokenizer"]), "--output", str(output)]
    for name in ("dino", "siglip", "vq"):
        if paths.get(name) is not None:
            args += [f"--{name}", str(paths[name])]
    return main(args + TINY_FLAGS + list(extra))


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, release):
    out = tmp_path_factory.mktemp("converted") / "OmniMamba-tiny-hf"
    assert _cli(release, out, "--verify", "--max-shard-size", "100KB") == 0
    return out


@pytest.fixture(scope="module")
def loaded(converted_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(converted_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(converted_dir)


def _no_leftovers(parent: Path, name: str):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---- the key table ---------------------------------------------------------------------------------------------------


def test_key_table_fixture_and_shape_rules():
    """The JSON holds the spec's 1674 entries; the tests' shape rules reproduce every 1.3B shape in it."""
    table = key_table()
    assert table["totals"] == {"siglip": 342, "dino": 343, "mamba": 639, "projector": 6, "vqvae": 344, "total": 1674}
    expanded = {}
    for row in table["appendix_a"]:
        for i in range(row["count"]):
            expanded[row["key"].replace("{i}", str(i))] = tuple(row["shape"])
    expanded.update({row["key"]: tuple(row["shape"]) for row in table["appendix_b"]})
    assert len(expanded) == 1674
    assert original_shapes(Dims.from_config(OmniMambaConfig()), OmniMambaVQVAEConfig()) == expanded


def test_every_1p3b_key_has_exactly_one_rule_and_renames_invert():
    table = key_table()
    keys = [r["key"].replace("{i}", str(i)) for r in table["appendix_a"] for i in range(r["count"])]
    keys += [r["key"] for r in table["appendix_b"]]
    kinds = {"renamed": 0, "tied": 0, "delegated": 0, "dropped": 0}
    for key in keys:
        rule = map_original_key(key)
        if isinstance(rule, str):
            kinds["renamed"] += 1
            assert hf_key_to_original(rule) == key, (key, rule)
        elif isinstance(rule, Tied):
            kinds["tied"] += 1
            assert rule.source in keys
        elif isinstance(rule, Delegate):
            kinds["delegated"] += 1
            assert key.startswith(DELEGATES[rule.name][0])
        else:
            kinds["dropped"] += 1
            assert key == f"{VQ}quantize.codebook_used"
    assert kinds == {"renamed": 639 - 2 + 6, "tied": 2, "delegated": 342 + 343 + 343, "dropped": 1}
    # the table is ordered: a specific rule before the generic one that would also match
    patterns = list(ORIGINAL_TO_HF)
    assert patterns.index(r"^llm_backbone\.vqvae\.quantize\.codebook_used$") < patterns.index(r"^llm_backbone\.vqvae\.")
    with pytest.raises(KeyError):
        map_original_key("llm_backbone.mamba.backbone.layers.0.mixer.in_proj.mmu_lora_A1.weight")


def _meta_table(table, dino_native_rows=None):
    sd = {}
    for row in table["appendix_a"] + table["appendix_b"]:
        for i in range(row.get("count", 1)):
            sd[row["key"].replace("{i}", str(i))] = torch.empty(row["shape"], device="meta")
    if dino_native_rows:
        sd[DINO + "pos_embed"] = torch.empty(1, dino_native_rows, 1024, device="meta")
    return sd


def test_full_1p3b_key_table_maps_completely_on_meta():
    """Both layouts of the released 1.3B model: one full state dict (1674 keys, 729-row DINOv2 table), and the release
    split (fp16 LM + projector with tied copies; timm DINOv2 at its native 37×37 = 1369 rows; open_clip SigLIP;
    LlamaGen `{"model": ...}`). Sizes are read from the tensors and equal the released configuration."""
    table = key_table()
    full = _meta_table(table)
    config = infer_config_from_state_dict(full)
    ref = OmniMambaConfig()
    t, r = config.text_config, ref.text_config
    for name in ("hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand", "head_dim", "num_heads",
                 "n_groups", "vocab_size"):  # fmt: skip
        assert getattr(t, name) == getattr(r, name), name
    for sub in ("dino_config", "siglip_config"):
        a, b = getattr(config.vision_config, sub), getattr(ref.vision_config, sub)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            assert getattr(a, name) == getattr(b, name), (sub, name)
    assert config.vision_config.dino_config.num_register_tokens == 4
    assert config.vision_config.siglip_config.intermediate_size == 4304
    for name in ("embed_dim", "num_embeddings", "latent_channels", "base_channels", "channel_multiplier",
                 "num_res_blocks", "num_patches", "image_size"):  # fmt: skip
        a, b = getattr(config.vq_config, name), getattr(ref.vq_config, name)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), name
    for name in ("projector_intermediate_size", "image_embedding_intermediate_size", "num_image_tokens",
                 "mmu_max_position_embeddings", "t2i_max_position_embeddings", "t2i_caption_length", "task_lora_rank",
                 "image_token_id", "pad_token_id", "eos_token_id", "soi_token_id", "mmu_token_id", "t2i_token_id"):  # fmt: skip
        assert getattr(config, name) == getattr(ref, name), name

    targets = target_key_shapes(config)
    converted = convert_state_dict(full, config)
    assert list(converted) == list(targets)
    assert {k: tuple(v.shape) for k, v in converted.items()} == targets
    model = _empty_model(config)
    for head, source in model._tied_weights_keys.items():
        converted[head] = converted[source]
    model.load_state_dict(converted, strict=True, assign=True)  # complete, strict
    model.tie_weights()
    n = sum(p.numel() for p in model.parameters())
    # spec §1.7: 2,280,114,379 parameters + the 2048 HF-only DINOv2 tensors (mask_token, class position row)
    assert n == 2_280_114_379 + 2048

    # the release split
    lm = {k: torch.empty(v.shape, dtype=torch.float16, device="meta") for k, v in full.items() if k.startswith((LM, "projector."))}
    assert len(lm) == 645  # 639 + 6, tied copies included
    parts = split(_meta_table(table, dino_native_rows=37 * 37))
    siglip = {f"visual.trunk.{k}": v for k, v in parts["siglip"].items()}
    weights = gather_original_weights(lm, dino=parts["dino"], siglip=siglip, vq={"model": parts["vq"]})
    assert infer_config_from_state_dict(weights).to_dict() == config.to_dict()
    split_converted = convert_state_dict(weights, config)
    assert {k: tuple(v.shape) for k, v in split_converted.items()} == targets
    assert split_converted["model.vision_model.dino.embeddings.position_embeddings"].shape == (1, 730, 1024)


# ---- the tiny release: convert, load, compare ------------------------------------------------------------------------


def test_output_directory_contents(converted_dir, tiny):
    names = {p.name for p in converted_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
            "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
            "conversion_report.json"} <= names  # fmt: skip
    assert len([n for n in names if n.startswith("model-") and n.endswith(".safetensors")]) > 1  # sharded
    assert _no_leftovers(converted_dir.parent, "nothing") and not [
        p for p in converted_dir.parent.iterdir() if p.name.startswith(".")
    ]
    gen = json.loads((converted_dir / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == 0 and gen["pad_token_id"] == tiny.pad_token_id
    card = (converted_dir / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == "hustvl/OmniMamba" and meta["license"] == "mit"
    assert "arxiv:2503.08686" in meta["tags"] and meta["paper"] == "https://arxiv.org/abs/2503.08686"
    report = json.loads((converted_dir / "conversion_report.json").read_text())
    assert report["dtype"] == "float32" and report["source_dtypes"] == ["float16", "float32"]
    assert all(r["passed"] for r in report["verification"].values())
    assert report["ignored_input_entries"] == {"timm-siglip": 3}  # open_clip text tower / logit scale+bias
    assert report["geometry"] == {"mamba_layers": tiny.text_config.num_hidden_layers,
                                  "dinov2_blocks": tiny.vision_config.dino_config.num_hidden_layers,
                                  "siglip_blocks": tiny.vision_config.siglip_config.num_hidden_layers}  # fmt: skip
    # the stored tensors: no tied duplicates, DINOv2 saved in transformers' on-disk naming
    index = json.loads((converted_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "image_head.weight" not in index
    assert "model.language_model.embeddings.weight" in index


def test_config_read_from_tensors(loaded, tiny):
    model, _ = loaded
    c = model.config
    for a, b in ((c.text_config, tiny.text_config), (c.vq_config, tiny.vq_config)):
        diff = {k: (v, b.to_dict().get(k)) for k, v in a.to_dict().items() if b.to_dict().get(k) != v}
        for k in ("dtype", "transformers_version", "chunk_size"):  # chunk_size: a kernel setting, not a shape
            diff.pop(k, None)
        assert not diff, diff
    for sub in ("dino_config", "siglip_config"):
        a, b = getattr(c.vision_config, sub).to_dict(), getattr(tiny.vision_config, sub).to_dict()
        diff = {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v and k not in ("dtype", "transformers_version")}
        assert not diff, (sub, diff)
    for name in ("num_image_tokens", "t2i_caption_length", "t2i_max_position_embeddings", "image_token_id",
                 "pad_token_id", "task_lora_rank", "projector_intermediate_size"):  # fmt: skip
        assert getattr(c, name) == getattr(tiny, name), name


def test_weights_are_the_original_values(loaded, original):
    model, _ = loaded
    sd = model.state_dict()
    full = original["full"]
    assert model.lm_head.weight is model.model.language_model.embeddings.weight  # tied, not duplicated
    assert model.image_head.weight is model.model.image_embeddings.embeddings.weight
    torch.testing.assert_close(sd["model.language_model.embeddings.weight"], full[f"{LM}backbone.embedding.weight"], atol=0, rtol=0)
    torch.testing.assert_close(
        sd["model.language_model.layers.1.mixer.in_proj.task_adapters.t2i.up.weight"],
        full[f"{LM}backbone.layers.1.mixer.in_proj.t2i_lora_B0.weight"], atol=0, rtol=0,
    )  # fmt: skip
    torch.testing.assert_close(sd["model.t2i_position_embeddings"], full[f"{LM}backbone.pos_embed"], atol=0, rtol=0)
    torch.testing.assert_close(sd["model.projector.linear_3.bias"], full["projector.projector.4.bias"], atol=0, rtol=0)
    # DINOv2 table: resampled from the native grid exactly like timm, class row 0
    pos = sd["model.vision_model.dino.embeddings.position_embeddings"]
    torch.testing.assert_close(pos[:, 1:], full[DINO + "pos_embed"], atol=0, rtol=0)
    assert not pos[:, 0].any()


def _mmu_inputs(processor, tiny, seed=0):
    import numpy as np
    import PIL.Image

    image = PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 33, 3), dtype=np.uint8))
    prompt = "USER: What digit is this? ASSISTANT:"
    inputs = processor(images=image, text=processor.image_token + prompt, return_tensors="pt")
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return inputs, prompt_ids


def _ids(tiny):
    return {"mmu": tiny.mmu_token_id, "soi": tiny.soi_token_id, "eoi": tiny.eoi_token_id, "sot": tiny.sot_token_id,
            "eot": tiny.eot_token_id, "t2i": tiny.t2i_token_id, "pad": tiny.pad_token_id}  # fmt: skip


def test_mmu_logits_equal_the_original_formulae(loaded, original, tiny):
    model, processor = loaded
    inputs, prompt_ids = _mmu_inputs(processor, tiny)
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        hf = model(**inputs).logits[0]
    want = reference.mmu_logits(
        original["lm"], original["dino"], original["siglip"], pv[0], pv[1], prompt_ids, _ids(tiny),
        dino_heads=2, siglip_heads=2,
    )  # fmt: skip
    assert hf.shape == want.shape == (4 + tiny.num_image_tokens + len(prompt_ids), tiny.text_vocab_size)
    torch.testing.assert_close(hf.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(hf[-1].argmax(), want[-1].argmax())
    # the reference's vision features equal the independent timm references of test_vision.py
    dc, sc = tiny.vision_config.dino_config, tiny.vision_config.siglip_config
    with torch.no_grad():
        ours = reference.vision_features(original["dino"], original["siglip"], pv[None, 0].double(), pv[None, 1].double(), 2, 2)
        dino_sd = {k: v.double() for k, v in original["dino"].items()}
        native_resampled = resample_dino_pos_embed(original["dino"]["pos_embed"], 2).double()
        independent = torch.cat(
            [ref_dino(dino_sd, dc, pv[None, 0].double(), pos=native_resampled),
             ref_siglip({k: v.double() for k, v in original["siglip"].items()}, sc, pv[None, 1].double())], dim=-1,
        )  # fmt: skip
    torch.testing.assert_close(ours, independent, atol=1e-10, rtol=1e-10)


def test_t2i_logits_equal_the_original_formulae(loaded, original, tiny):
    model, processor = loaded
    caption_ids = processor.tokenizer("a red bicycle", add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings():  # the tiny caption slots truncate the caption (the processor warns)
        warnings.simplefilter("ignore")
        prompt = processor(text=["a red bicycle"], generation_mode="image", return_tensors="pt")["input_ids"][0]
    assert prompt.tolist() == reference.t2i_prompt_ids(caption_ids, tiny.t2i_caption_length, _ids(tiny))
    codes = torch.randint(0, tiny.image_vocab_size, (tiny.num_generated_image_tokens,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = model(input_ids=torch.cat([prompt, codes + tiny.text_vocab_size])[None], task="t2i").logits[0]
    want = reference.t2i_logits(original["lm"], prompt.tolist(), codes.tolist())
    assert hf.shape == want.shape == (tiny.t2i_prompt_length + len(codes), tiny.image_vocab_size)
    torch.testing.assert_close(hf.double(), want, atol=1e-4, rtol=1e-5)
    # the task adapters matter: the MMU adapter gives different image logits
    other = original["lm"].copy()
    for k in list(other):
        if "t2i_lora" in k:
            other[k] = other[k.replace("t2i_lora", "mmu_lora")]
    assert (reference.t2i_logits(other, prompt.tolist(), codes.tolist()) - want).abs().max() > 1e-3


def test_vq_decode_equals_llamagen(loaded, original, tiny):
    model, _ = loaded
    grid = tiny.vq_config.num_patches
    codes = torch.randint(0, tiny.image_vocab_size, (2, grid * grid), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf = model.model.vqmodel.decode_codes(codes)
    want = reference.vq_decode_code(original["vq"], codes, grid)
    torch.testing.assert_close(hf.double(), want, atol=1e-5, rtol=1e-5)
    # the conversion reference agrees with test_vq.py's independent LlamaGen decode
    independent = ref_decode_code({k: v.double() for k, v in original["vq"].items()}, tiny.vq_config, codes)
    torch.testing.assert_close(want, independent, atol=1e-10, rtol=1e-10)


def test_reference_mixer_is_the_per_timestep_recurrence_of_the_chunked_model(loaded, original):
    """The reference's Mamba-2 loop equals the converted model's chunked SSD mixer on the same input (float64)."""
    model, _ = loaded
    mixer = model.model.language_model.layers[1].mixer.double()
    u = torch.randn(1, 11, mixer.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    try:
        with torch.no_grad():
            for task in ("mmu", "t2i"):
                want = reference.mamba2_mixer(original["lm"], 1, u, task)
                torch.testing.assert_close(mixer(u, task), want, atol=1e-10, rtol=1e-10)
    finally:
        mixer.float()


def test_full_checkpoint_layout_converts_to_the_same_weights(tmp_path, original, release, converted_dir):
    """A full `OmniMamba.state_dict()` in one fp32 file (towers at 384-style grid, VQ with `codebook_used`, tied
    aliases sharing storage) gives the same model as the release split."""
    full = dict(original["full"])
    torch.save(full, tmp_path / "pytorch_model.bin")
    out = tmp_path / "from-full"
    assert _cli({"checkpoint": tmp_path / "pytorch_model.bin", "tokenizer": release["tokenizer"]}, out) == 0
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for p in sorted(d.glob("model*.safetensors")) for k, v in load_file(p).items()}

    a, b = weights(out), weights(converted_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dtype_bfloat16(tmp_path, release):
    out = tmp_path / "bf16"
    _cli(release, out, "--dtype", "bfloat16", "--verify")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_config_overrides_are_checked_field_by_field(tmp_path, release):
    for bad, name in (({"foo_bar": 1}, "'foo_bar'"), ({"text_config": {"num_head": 2}}, "'text_config.num_head'")):
        with pytest.raises(ValueError, match=f"{name} is not an OmniMambaConfig field"):
            _cli(release, tmp_path / "bad", "--config-overrides", json.dumps(bad))
        assert not (tmp_path / "bad").exists()
    out = tmp_path / "ok"
    _cli(release, out, "--config-overrides", json.dumps({"t2i_caption_length": 6, "text_config": {"time_step_floor": 2e-4}}))
    assert json.loads((out / "config.json").read_text())["text_config"]["time_step_floor"] == 2e-4


def test_push_to_hub_uses_upload_folder(tmp_path, release, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))
            assert (Path(kw["folder_path"]) / "config.json").is_file()  # only the finished directory is uploaded

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pushed"
    # no token, or offline: refused before any work (not after the whole conversion); the tests run offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        _cli(release, out, "--push-to-hub", "someone/OmniMamba-tiny")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        _cli(release, out, "--push-to-hub", "someone/OmniMamba-tiny")
    assert not out.exists() and calls == []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _cli(release, out, "--push-to-hub", "someone/OmniMamba-tiny", "--private")
    assert [c[:2] for c in calls] == [("create_repo", "someone/OmniMamba-tiny"), ("upload_folder", "someone/OmniMamba-tiny")]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(out.absolute())
    # an upload that fails keeps the finished conversion and says how to retry the upload alone
    monkeypatch.setattr(FakeApi, "upload_folder", lambda self, **kw: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(RuntimeError, match="hf upload someone/OmniMamba-tiny"):
        _cli(release, tmp_path / "kept", "--push-to-hub", "someone/OmniMamba-tiny")
    assert (tmp_path / "kept" / "config.json").is_file()


# ---- refusals: precise messages, nothing left behind -------------------------------------------------------------------


def _refused(paths, tmp_path, match, *extra):
    out = tmp_path / "out" / "model"
    with pytest.raises(ValueError, match=match) as err:
        _cli(paths, out, *extra)
    assert _no_leftovers(out.parent, out.name) if out.parent.exists() else True
    assert not (tmp_path / "out").exists()  # the parent this run would have created is gone too
    return str(err.value)


def _write_ckpt(tmp_path, lm):
    path = tmp_path / "edited.pth"
    torch.save({k: v.half().clone() for k, v in lm.items()}, path)
    return path


def test_truncated_checkpoint(tmp_path, release):
    data = release["checkpoint"].read_bytes()
    cut = tmp_path / "OmniMamba-tiny.pth"
    cut.write_bytes(data[: len(data) // 2])
    msg = _refused({**release, "checkpoint": cut}, tmp_path, r"Cannot read .*OmniMamba-tiny\.pth .*truncated")
    assert f"{len(data) // 2:,} bytes" in msg


def test_truncated_tower(tmp_path, release):
    data = (release["dino"] / "model.safetensors").read_bytes()
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "model.safetensors").write_bytes(data[:-100])
    _refused({**release, "dino": tmp_path / "dino"}, tmp_path, r"Cannot read .*dino/model\.safetensors")


def test_wrong_files(tmp_path, release):
    msg = _refused({**release, "checkpoint": release["vq"], "vq": None}, tmp_path, "holds no OmniMamba language model")
    assert "LlamaGen VQ state dict (pass it with --vq)" in msg
    _refused({**release, "dino": release["tokenizer"] / "tokenizer.json"}, tmp_path, r"Cannot read .*tokenizer\.json")
    # the two towers swapped
    msg = _refused({**release, "dino": release["siglip"], "siglip": release["dino"]}, tmp_path, "DINOv2 tower")
    assert "missing keys ['cls_token'" in msg or "cls_token" in msg


def test_converted_directory_given_as_checkpoint(tmp_path, release, converted_dir):
    msg = _refused({**release, "checkpoint": converted_dir}, tmp_path, "holds no OmniMamba language model")
    assert "already converted Hugging Face OmniMamba checkpoint" in msg and "--vq" not in msg


def test_missing_tower(tmp_path, release):
    msg = _refused({**release, "siglip": None}, tmp_path, "The SigLIP tower is missing")
    assert "vision_backbone.siglip_featurizer." in msg and "--siglip" in msg
    _refused({**release, "vq": None}, tmp_path, "The LlamaGen VQ is missing.*--vq")


def test_tower_given_twice(tmp_path, original, release):
    path = tmp_path / "with-dino.pth"
    torch.save({**{k: v.half() for k, v in original["lm"].items()}, **{DINO + k: v for k, v in original["dino"].items()}}, path)
    _refused({**release, "checkpoint": path}, tmp_path, "The DINOv2 tower is given twice")


def test_shape_mismatch(tmp_path, original, release):
    lm = dict(original["lm"])
    key = f"{LM}backbone.layers.1.mixer.conv1d.bias"
    lm[key] = lm[key][:-1]
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "shape mismatches")
    assert f"{key} -> model.language_model.layers.1.mixer.conv1d.bias: (79,), expected (80,)" in msg
    siglip = {f"visual.trunk.{k}": v for k, v in original["siglip"].items()}
    siglip["visual.trunk.blocks.2.mlp.fc2.weight"] = torch.zeros(24, 41)
    torch.save(siglip, tmp_path / "siglip.bin")
    msg = _refused({**release, "siglip": tmp_path / "siglip.bin"}, tmp_path, "SigLIP tower")
    assert "blocks.2.mlp.fc2.weight" in msg


def test_extra_and_missing_keys(tmp_path, original, release):
    lm = dict(original["lm"])
    lm[f"{LM}backbone.layers.0.mixer.in_proj.mmu_lora_A1.weight"] = torch.zeros(8, 32)
    lm[f"{LM}backbone.final_layer.weight"] = torch.zeros(3)
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "unexpected source keys")
    assert f"{LM}backbone.layers.0.mixer.in_proj.mmu_lora_A1.weight" in msg and f"{LM}backbone.final_layer.weight" in msg
    lm = dict(original["lm"])
    del lm[f"{LM}backbone.layers.1.mixer.D"]
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "missing source keys")
    assert f"{LM}backbone.layers.1.mixer.D (-> model.language_model.layers.1.mixer.D)" in msg
    vq = {**original["vq"], "decoder.conv_blocks.0.res.0.extra.weight": torch.zeros(2)}
    torch.save({"model": vq}, tmp_path / "vq.pt")
    msg = _refused({**release, "vq": tmp_path / "vq.pt"}, tmp_path, "LlamaGen VQ")
    assert "decoder.conv_blocks.0.res.0.extra.weight" in msg


def test_checkpoint_cut_after_a_layer_is_flagged(tmp_path, original, release, caplog):
    lm = {k: v for k, v in original["lm"].items() if ".layers.1." not in k}  # the tiny model's last Mamba layer
    out = tmp_path / "cut"
    with caplog.at_level("WARNING", logger="omnimamba_hf.conversion"):
        _cli({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, out)
    assert "if this is meant to be the released checkpoint, it is truncated" in caplog.text
    assert json.loads((out / "conversion_report.json").read_text())["geometry"]["mamba_layers"] == 1


def test_non_finite_source_values_are_named(tmp_path, original, release):
    lm = dict(original["lm"])
    lm[f"{LM}backbone.layers.1.mixer.D"] = lm[f"{LM}backbone.layers.1.mixer.D"].clone()
    lm[f"{LM}backbone.layers.1.mixer.D"][0] = float("nan")
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "NaN or infinite")
    assert f"{LM}backbone.layers.1.mixer.D" in msg


def test_tied_copy_must_equal_its_source(tmp_path, original, release):
    lm = dict(original["lm"])
    lm[f"{LM}img_head.weight"] = lm[f"{LM}img_head.weight"].clone()
    lm[f"{LM}img_head.weight"][3, 5] += 1
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "tied copies differ")
    assert f"{LM}img_head.weight (64, 32) differs from {LM}backbone.img_embeddings.word_embeddings.weight" in msg
    # a file without the aliases (e.g. saved with safetensors' de-duplication) is fine: they are optional
    lm = {k: v for k, v in original["lm"].items() if not k.endswith(("lm_head.weight", "img_head.weight"))}
    weights = gather_original_weights(lm, dino=original["dino"], siglip=original["siglip"], vq=original["vq"])
    config = infer_config_from_state_dict(weights, **{k: v for k, v in TINY_KWARGS.items() if k != "progress"})
    assert len(convert_state_dict(weights, config)) == len(target_key_shapes(config))


def test_stage1_partial_checkpoint_is_refused(tmp_path, original, release):
    lm = {k: v for k, v in original["lm"].items() if not k.startswith("projector.") and "mmu_pos_embed" not in k}
    msg = _refused({**release, "checkpoint": _write_ckpt(tmp_path, lm)}, tmp_path, "stage-1 T2I checkpoint")
    assert "projector.projector.0.weight" in msg


def test_wrong_tokenizer(tmp_path, release):
    tok_dir = tmp_path / "tok"
    make_base_tokenizer(280).save_pretrained(tok_dir)
    _refused({**release, "tokenizer": tok_dir}, tmp_path, "embedding.weight has 320: wrong tokenizer")


def test_verification_catches_a_mapping_error_and_leaves_nothing(tmp_path, release, monkeypatch):
    """A converter bug that keeps every key and shape (layer 0's two task adapters swapped) passes the key checks;
    --verify catches it against the original formulae, and the output is never moved into place."""
    import omnimamba_hf.conversion.convert_omnimamba_weights_to_hf as conv

    real = conv.convert_state_dict

    def buggy(*args, **kwargs):
        sd = real(*args, **kwargs)
        a, b = (f"model.language_model.layers.0.mixer.in_proj.task_adapters.{t}.up.weight" for t in ("mmu", "t2i"))
        sd[a], sd[b] = sd[b], sd[a]
        return sd

    monkeypatch.setattr(conv, "convert_state_dict", buggy)
    msg = _refused(release, tmp_path, "Verification failed", "--verify")
    assert "mmu_logits" in msg and "t2i_logits" in msg and "vq_decode" not in msg


def test_interrupt_while_writing_leaves_nothing(tmp_path, release, monkeypatch):
    from omnimamba_hf.processing.processing_omnimamba import OmniMambaProcessor

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(OmniMambaProcessor, "save_pretrained", interrupted)
    out = tmp_path / "out" / "model"
    with pytest.raises(KeyboardInterrupt):
        _cli(release, out)
    assert not (tmp_path / "out").exists()


def test_existing_output_and_overwrite(tmp_path, release):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        _cli(release, out)
    assert (out / "keep.txt").exists()
    # --overwrite replaces an earlier conversion or an empty directory, never other files
    with pytest.raises(ValueError, match="not an earlier conversion"):
        _cli(release, out, "--overwrite")
    assert (out / "keep.txt").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["existing"]
    (out / "keep.txt").unlink()
    assert _cli(release, out, "--overwrite") == 0
    first = (out / "conversion_report.json").read_text()
    assert _cli(release, out, "--overwrite", "--dtype", "bfloat16") == 0  # an earlier conversion is replaced
    assert (out / "conversion_report.json").read_text() != first
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700


def test_output_holding_an_input_is_refused(tmp_path, release):
    root = Path(release["checkpoint"]).parent
    before = sorted(p.name for p in root.iterdir())
    for output in (root, root.parent):
        with pytest.raises(ValueError, match="inside the output directory"):
            _cli(release, output, "--overwrite")
    assert sorted(p.name for p in root.iterdir()) == before


def test_atomic_output_dir_cleans_up_on_any_exception(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half-written.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    with atomic_output_dir(target) as tmp:
        (tmp / "done").write_text("ok")
    assert (target / "done").read_text() == "ok" and [p.name for p in target.parent.iterdir()] == ["out"]


def test_module_help_runs():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "omnimamba_hf.conversion.convert_omnimamba_weights_to_hf", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "--checkpoint" in result.stdout and "--push-to-hub" in result.stdout
    assert "RuntimeWarning" not in result.stderr


# ---- full size (slow: about 10 GB of RAM and 15 GB of disk; run with RUN_SLOW=1, ideally with a GPU) ------------------


def _gpt_neox_sized_tokenizer():
    """A stand-in with GPT-NeoX-20B's 50277 ids (`<|endoftext|>` 0, `<|padding|>` 1): a word-level vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1, **{f"w{i}": i for i in range(2, 50277)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@pytest.mark.slow
def test_full_size_random_release_converts_and_verifies(tmp_path):
    """The released geometry with random weights, published layout (fp16 .pth with tied copies, timm DINOv2 at its
    native 37×37 table, open_clip SigLIP, LlamaGen VQ), through the command line with --verify."""
    import os

    if not os.environ.get("RUN_SLOW"):
        pytest.skip("set RUN_SLOW=1")
    config = OmniMambaConfig()
    d = Dims.from_config(config)
    sd = random_original_state_dict(original_shapes(d), seed=0)
    parts = split(sd)
    parts["dino"]["pos_embed"] = 0.5 * torch.randn(1, 37 * 37, d.dino_width, generator=torch.Generator().manual_seed(5))
    vq = split(with_vq({}, config.vq_config, seed=1))["vq"]
    paths = write_original_release(tmp_path / "in", parts["lm"], parts["dino"], parts["siglip"], vq, _gpt_neox_sized_tokenizer())
    del sd, parts, vq
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = tmp_path / "OmniMamba-1.3B-hf"
    args = ["--checkpoint", str(paths["checkpoint"]), "--dino", str(paths["dino"]), "--siglip", str(paths["siglip"]),
            "--vq", str(paths["vq"]), "--tokenizer", str(paths["tokenizer"]), "--output", str(out), "--verify",
            "--verify-device", device, "--quiet"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    print(json.dumps(report["verification"], indent=1))
    assert report["parameters"] == 2_280_114_379 + 2048
    assert all(r["passed"] for r in report["verification"].values())
