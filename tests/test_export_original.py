"""Export back to the original release layout (`conversion.export_to_original`), CPU and offline, a few seconds.

A tiny random model is exported, checked against the original key table (exact key set and shapes; the 1.3B model on
the meta device against the spec's 1674 entries), converted back by the package's converter (identical weights, and
`--verify` against the independent original formulae), and the refusals (what the original layout cannot hold) and the
atomic writer are exercised.
"""

from __future__ import annotations


import pytest
import torch
from common import make_base_tokenizer, randomize_routing_, tiny_config
from reference_original import Dims, key_table, original_shapes
from test_vision import timm_dino_sd, timm_siglip_sd
from test_vq import random_llamagen_state_dict

from omnimamba_hf import OmniMambaForConditionalGeneration
from omnimamba_hf.cli import main as cli_main
from omnimamba_hf.conversion import (
    convert_dino_state_dict_to_timm,
    convert_omnimamba_checkpoint,
    convert_siglip_state_dict_to_timm,
    convert_state_dict,
    convert_timm_dino_state_dict,
    convert_timm_siglip_state_dict,
    convert_vq_state_dict_to_llamagen,
    export_original_state_dict,
    infer_config_from_state_dict,
    save_original_checkpoint,
)
from omnimamba_hf.conversion.convert_omnimamba_weights_to_hf import _empty_model
from omnimamba_hf.conversion.vq_llamagen import (
    LLAMAGEN_VQ_INVERSE_RENAMES,
    LLAMAGEN_VQ_RENAMES,
    convert_llamagen_vq_state_dict,
    llamagen_name_of_vq_key,
    rename_llamagen_vq_key,
)
from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaConfig

TINY_KWARGS = dict(t2i_caption_length=6, dino_num_attention_heads=2, siglip_num_attention_heads=2)


def _exportable(model):
    """As the demo does for a model trained from scratch: timm's DINOv2 has no class position and no mask token."""
    with torch.no_grad():
        emb = model.model.vision_model.dino.embeddings
        emb.position_embeddings[:, 0].zero_()
        emb.mask_token.zero_()
    return model


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return _exportable(randomize_routing_(OmniMambaForConditionalGeneration(tiny_config()).eval(), seed=seed))


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _assert_same_weights(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---- keys ------------------------------------------------------------------------------------------------------------


def test_exported_keys_and_shapes_are_the_original_layout(model):
    sd = export_original_state_dict(model)
    want = original_shapes(Dims.from_config(model.config), model.config.vq_config)  # the spec's table, tiny sizes
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert not sd["llm_backbone.vqvae.quantize.codebook_used"].any()  # LlamaGen's fresh usage buffer
    # the tied aliases are the very same tensor as their source (stored once by torch.save)
    lm = "llm_backbone.mamba."
    assert sd[f"{lm}lm_head.weight"].data_ptr() == sd[f"{lm}backbone.embedding.weight"].data_ptr()
    assert sd[f"{lm}img_head.weight"].data_ptr() == sd[f"{lm}backbone.img_embeddings.word_embeddings.weight"].data_ptr()


def test_full_1p3b_export_equals_the_key_table_on_meta():
    """The released geometry (meta tensors): exactly the spec's 1674 original entries with their shapes."""
    sd = export_original_state_dict(_empty_model(OmniMambaConfig()))
    table = key_table()
    rows = [(row["key"].replace("{i}", str(i)), row["shape"]) for row in table["appendix_a"] for i in range(row["count"])]
    want = {key: tuple(shape) for key, shape in rows}
    want.update({row["key"]: tuple(row["shape"]) for row in table["appendix_b"]})
    assert len(want) == 1674
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


# ---- round trips -----------------------------------------------------------------------------------------------------


def test_export_then_convert_gives_the_same_state_dict(model):
    sd = export_original_state_dict(model)
    config = infer_config_from_state_dict(sd, **TINY_KWARGS)
    back = convert_state_dict(sd, config)
    ours = model.state_dict()
    tied = model._tied_weights_keys
    assert set(back) == set(ours) - set(tied)  # the converter leaves the tied heads to the model
    _assert_same_weights(back, {k: v for k, v in ours.items() if k not in tied})


def test_save_convert_verify_reload(model, tmp_path):
    """Through files: `.pth` → `convert_omnimamba_checkpoint` with `verify=True` (the independent original formulae on
    the exported weights) → `from_pretrained` gives the same weights and logits."""
    path = save_original_checkpoint(model, tmp_path / "OmniMamba-tiny.pth")
    assert path == (tmp_path / "OmniMamba-tiny.pth").absolute() and [p.name for p in tmp_path.iterdir()] == [path.name]
    _assert_same_weights(torch.load(path, weights_only=True), export_original_state_dict(model))
    tokenizer = tmp_path / "tokenizer"
    make_base_tokenizer().save_pretrained(tokenizer)
    out = tmp_path / "converted"
    c = model.config
    report = convert_omnimamba_checkpoint(
        path, out, tokenizer=str(tokenizer), hash_inputs=False, verify=True, progress=False,
        config_overrides={"text_config": {"chunk_size": c.text_config.chunk_size}}, **TINY_KWARGS,
    )  # fmt: skip
    assert all(r["passed"] for r in report["verification"].values())
    back = OmniMambaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    _assert_same_weights(back.state_dict(), model.state_dict())
    ids = torch.tensor([[c.t2i_token_id, c.sot_token_id, *[c.pad_token_id] * 4, 8, 9, c.eot_token_id, c.soi_token_id]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, task="t2i").logits, back(input_ids=ids, task="t2i").logits)


def test_tower_inverses_give_back_the_timm_weights():
    vcfg = tiny_config().vision_config
    for forward, inverse, timm in (
        (convert_timm_dino_state_dict, convert_dino_state_dict_to_timm, timm_dino_sd(vcfg.dino_config)),
        (convert_timm_siglip_state_dict, convert_siglip_state_dict_to_timm, timm_siglip_sd(vcfg.siglip_config)),
    ):
        _assert_same_weights(inverse(forward(timm, vcfg), vcfg), timm)


def test_vq_inverse_renames_invert_the_forward_table():
    assert len(LLAMAGEN_VQ_INVERSE_RENAMES) == len(LLAMAGEN_VQ_RENAMES)
    first = (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.conv_blocks.\1.res.\2.")
    assert LLAMAGEN_VQ_INVERSE_RENAMES[0] == first
    assert LLAMAGEN_VQ_INVERSE_RENAMES[-1] == (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2.")
    # LlamaGen → HF → LlamaGen is the identity, key by key and on a whole state dict
    vq_config = tiny_config().vq_config
    llamagen = random_llamagen_state_dict(vq_config, seed=2)
    for key in llamagen:
        if key != "quantize.codebook_used":
            assert llamagen_name_of_vq_key(rename_llamagen_vq_key(key)) == key, key
    back = convert_vq_state_dict_to_llamagen(convert_llamagen_vq_state_dict(llamagen, vq_config), vq_config)
    _assert_same_weights(back, {**llamagen, "quantize.codebook_used": torch.zeros(65536)})
    assert "quantize.codebook_used" not in convert_vq_state_dict_to_llamagen(
        convert_llamagen_vq_state_dict(llamagen, vq_config), vq_config, codebook_used=False
    )



def test_nonzero_mask_token_is_refused():
    model = _tiny_model(seed=1)
    with torch.no_grad():
        model.model.vision_model.dino.embeddings.mask_token[0, 3] = 0.5
    with pytest.raises(ValueError, match=r"mask_token is non-zero \(max \|value\| 0\.5\).*zero it to export"):
        export_original_state_dict(model)


def test_nonzero_class_position_is_refused_and_folding_it_keeps_the_outputs():
    model = _tiny_model(seed=2)
    emb = model.model.vision_model.dino.embeddings
    with torch.no_grad():
        emb.position_embeddings[:, 0] = torch.randn(emb.position_embeddings.shape[-1])
    with pytest.raises(ValueError, match=r"non-zero class row.*cls_token \+= emb\.position_embeddings\[:, :1\]"):
        export_original_state_dict(model)
    pixels = torch.randn(2, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.model.vision_model(pixels)
        emb.cls_token += emb.position_embeddings[:, :1]  # the fix the message gives
        emb.position_embeddings[:, 0] = 0
        assert torch.equal(model.model.vision_model(pixels), before)
    assert "vision_backbone.dino_featurizer.cls_token" in export_original_state_dict(model)


def test_untied_head_and_unknown_keys_are_refused():
    model = _tiny_model(seed=3)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match="llm_backbone.mamba.lm_head.weight differs from llm_backbone.mamba.backbone"):
        export_original_state_dict(model)
    model = _tiny_model(seed=3)
    model.model.register_buffer("extra_statistics", torch.zeros(3))
    model.model.language_model.layers[1].mixer.register_buffer("scale", torch.ones(2))  # the reverse table names it
    with pytest.raises(ValueError, match="2 keys of the model have no name in the original") as err:
        export_original_state_dict(model)
    assert "model.extra_statistics" in str(err.value) and "model.language_model.layers.1.mixer.scale" in str(err.value)


# ---- the atomic writer and the command line --------------------------------------------------------------------------


def test_failed_save_leaves_no_file(model, tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_original_checkpoint(model, tmp_path / "out.pth")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out.pth").write_bytes(b"previous")  # an existing file survives a failed overwrite
    with pytest.raises(OSError, match="disk full"):
        save_original_checkpoint(model, tmp_path / "out.pth", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"] and (tmp_path / "out.pth").read_bytes() == b"previous"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="already exists"):
        save_original_checkpoint(model, tmp_path / "out.pth")
    save_original_checkpoint(model, tmp_path / "out.pth", overwrite=True)
    _assert_same_weights(torch.load(tmp_path / "out.pth", weights_only=True), export_original_state_dict(model))
    bad = _tiny_model(seed=4)
    with torch.no_grad():
        bad.model.vision_model.dino.embeddings.mask_token.fill_(1)
    with pytest.raises(ValueError, match="mask_token"):  # refused before anything is written
        save_original_checkpoint(bad, tmp_path / "sub" / "bad.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]


def test_cli_export_original(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "OmniMamba.pth"
    assert cli_main(["export-original", str(tmp_path / "model"), str(out)]) == 0
    assert "original OmniMamba layout" in capsys.readouterr().out
    _assert_same_weights(torch.load(out, weights_only=True), export_original_state_dict(model))
    assert cli_main(["export-original", str(tmp_path / "model"), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export-original", str(tmp_path / "model"), str(out), "--overwrite"]) == 0
    assert cli_main(["export-original", str(tmp_path / "missing"), str(tmp_path / "x.pth")]) == 1
    assert capsys.readouterr().err.endswith("missing: no such model directory.\n") and not (tmp_path / "x.pth").exists()
    (tmp_path / "empty").mkdir()
    assert cli_main(["export-original", str(tmp_path / "empty"), str(tmp_path / "x.pth")]) == 1
    assert "omnimamba-hf export-original: " in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
