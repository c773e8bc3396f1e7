"""Model-level checks on tiny configurations: shapes, cache == recomputation, batching, task routing, losses,
save/load, Auto classes, tied weights, the full-size parameter count, and clear errors on bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, DynamicCache

from common import mmu_prompt_ids, randomize_routing_, t2i_prompt_ids, tiny_config
from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration, OmniMambaModel


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return randomize_routing_(OmniMambaForConditionalGeneration(config)).eval()


mmu_ids, t2i_ids = mmu_prompt_ids, t2i_prompt_ids


def pixels(n=1, seed=0):
    return torch.randn(n, 2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_tuple_output(model, config):
    ids = torch.tensor([mmu_ids(config)])
    out = model(input_ids=ids, pixel_values=pixels())
    assert out.logits.shape == (1, ids.shape[1], config.text_vocab_size)
    assert out.image_hidden_states.shape == (1, config.num_image_tokens, config.text_config.hidden_size)
    as_tuple = model(input_ids=ids, pixel_values=pixels(), return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    t2i = model(input_ids=torch.tensor([t2i_ids(config, codes=(1, 2, 3))]), task="t2i")
    assert t2i.logits.shape == (1, config.t2i_prompt_length + 3, config.image_vocab_size)
    base = OmniMambaModel(config)(input_ids=ids, pixel_values=pixels())
    assert base.last_hidden_state.shape == (1, ids.shape[1], config.text_config.hidden_size)


@pytest.mark.parametrize("task", ["mmu", "t2i"])
def test_cached_decoding_equals_recomputation(model, config, task):
    if task == "mmu":
        ids = torch.tensor([mmu_ids(config) + [11, 12, 13, 14, 15]])
        kwargs, prompt = {"pixel_values": pixels()}, len(mmu_ids(config))
    else:
        ids = torch.tensor([t2i_ids(config, codes=(4, 60, 7, 0, 33))])
        kwargs, prompt = {}, config.t2i_prompt_length
    full = model(input_ids=ids, task=task, **kwargs).logits
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    step = model(input_ids=ids[:, :prompt], task=task, cache=cache, use_cache=True, **kwargs)
    torch.testing.assert_close(step.logits, full[:, :prompt], rtol=1e-5, atol=1e-5)
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], task=task, cache=cache, position_ids=torch.tensor([[t]]))
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("old_name", ["cache_params", "past_key_values"])
def test_pre_5_24_cache_names_still_work(model, config, old_name):
    # transformers 5.24 renamed `cache_params` / `past_key_values` to `cache`; the old names warn and do the same
    ids = torch.tensor([t2i_ids(config, codes=(4, 60))])
    prompt, position = config.t2i_prompt_length, torch.tensor([[config.t2i_prompt_length]])

    def continue_with(name):
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        model(input_ids=ids[:, :prompt], task="t2i", use_cache=True, cache=cache)
        return model(input_ids=ids[:, prompt:], task="t2i", position_ids=position, **{name: cache})

    new = continue_with("cache")
    with pytest.warns(FutureWarning, match="Use `cache` instead"):
        old = continue_with(old_name)
    torch.testing.assert_close(old.logits, new.logits, rtol=0, atol=0)
    torch.testing.assert_close(old.cache.get_recurrent_state(0), new.cache.get_recurrent_state(0), rtol=0, atol=0)
    # negative control: dropped into **kwargs, the old name would leave the step without the prompt's state
    fresh = model(input_ids=ids[:, prompt:], task="t2i", position_ids=position).logits
    assert not torch.allclose(fresh, new.logits)


def test_left_padded_batch_equals_single(model, config):
    short, long = mmu_ids(config, (5, 6)), mmu_ids(config, (5, 6, 7, 8, 9))
    pad = len(long) - len(short)
    ids = torch.tensor([[config.pad_token_id] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    px = torch.cat([pixels(seed=1), pixels(seed=2)])
    batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=px).logits
    one = model(input_ids=torch.tensor([short]), pixel_values=pixels(seed=1)).logits
    two = model(input_ids=torch.tensor([long]), pixel_values=pixels(seed=2)).logits
    torch.testing.assert_close(batched[0, pad:], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], two[0], rtol=1e-5, atol=1e-5)


def test_mixed_task_batch_equals_single_task_calls(model, config):
    a = mmu_ids(config, (5, 6, 7, 8, 9, 10))
    b = t2i_ids(config, codes=(4, 5, 6, 7))
    assert len(a) == len(b)
    ids = torch.tensor([a, b])
    labels = ids.clone()
    labels[0, : 4 + config.num_image_tokens] = -100  # MMU: the answer part is supervised
    labels[1, : config.t2i_prompt_length] = -100  # T2I: the image tokens are supervised
    out = model(input_ids=ids, pixel_values=pixels(), task=["mmu", "t2i"], labels=labels)
    mmu = model(input_ids=ids[:1], pixel_values=pixels(), labels=labels[:1])
    t2i = model(input_ids=ids[1:], task="t2i", labels=labels[1:])
    V = config.text_vocab_size
    assert out.logits.shape == (2, len(a), V + config.image_vocab_size)
    torch.testing.assert_close(out.logits[0, :, :V], mmu.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1, :, V:], t2i.logits[0], rtol=1e-5, atol=1e-5)
    assert (out.logits[0, :, V:] < -1e30).all() and (out.logits[1, :, :V] < -1e30).all()
    torch.testing.assert_close(out.mmu_loss, mmu.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.t2i_loss, t2i.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, mmu.loss + t2i.loss, rtol=1e-5, atol=1e-6)


def test_loss_is_the_original_shifted_cross_entropy(model, config):
    ids = torch.tensor([t2i_ids(config, codes=(1, 2, 3, 4, 5, 6))])
    labels = ids.clone()
    labels[:, : config.t2i_prompt_length] = -100
    out = model(input_ids=ids, task="t2i", labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    expected = F.cross_entropy(logits[keep], target[keep] - config.text_vocab_size)
    torch.testing.assert_close(out.loss, expected)
    assert out.mmu_loss is None and out.t2i_loss is not None


def test_text_only_layout_uses_zero_image_features(model, config):
    ids = torch.tensor([mmu_ids(config)])
    out = model(input_ids=ids, image_flags=torch.tensor([False]))
    # independent: put zeros in the slots by hand
    embeds = model.model.embed_tokens(ids, "mmu")
    embeds[ids == config.image_token_id] = 0.0
    ref = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(out.logits, ref)


def test_generated_placeholder_id_is_an_ordinary_token(model, config):
    """The MMU head covers the image placeholder id, so sampling can choose it; fed back while decoding (a state, no
    images) it is embedded like any token, as the original does, instead of raising for a lone placeholder. The step
    equals the same step given its embedding directly."""
    ids = torch.tensor([mmu_ids(config)])
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels(), cache=cache, use_cache=True)
        state = copy.deepcopy(cache)
        new, position = torch.tensor([[config.image_token_id]]), torch.tensor([[ids.shape[1]]])
        step = model(input_ids=new, cache=cache, position_ids=position, use_cache=True).logits
        embeds = model.model.embed_tokens(new, "mmu")
        ref = model(inputs_embeds=embeds, cache=state, position_ids=position, use_cache=True).logits
    torch.testing.assert_close(step, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a multiple of num_image_tokens"):  # without a state it is still an error
        model(input_ids=new)


def test_save_load_round_trip_auto_classes_and_tying(model, config, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # sharded safetensors
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "OmniMambaConfig"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is OmniMambaForConditionalGeneration
    assert loaded.lm_head.weight is loaded.model.language_model.embeddings.weight
    assert loaded.image_head.weight is loaded.model.image_embeddings.embeddings.weight
    ids = torch.tensor([mmu_ids(config)])
    assert torch.equal(loaded(input_ids=ids, pixel_values=pixels()).logits, model(input_ids=ids, pixel_values=pixels()).logits)
    t2i = torch.tensor([t2i_ids(config, codes=(3, 4))])
    assert torch.equal(loaded(input_ids=t2i, task="t2i").logits, model(input_ids=t2i, task="t2i").logits)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert type(AutoModel.from_pretrained(tmp_path)) is OmniMambaModel
    assert loaded.dtype == torch.float32
    assert AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    # dtype="auto" keeps the saved dtype; device_map places the whole model (accelerate's big-model loading path)
    bf16_dir = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16_dir)
    auto = AutoModelForImageTextToText.from_pretrained(bf16_dir, dtype="auto", device_map="cpu")
    assert auto.dtype == torch.bfloat16 and auto.device.type == "cpu"
    assert auto.lm_head.weight is auto.model.language_model.embeddings.weight


def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    model = randomize_routing_(OmniMambaForConditionalGeneration(config)).train()
    model.config.task_lora_dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.tensor([t2i_ids(config, codes=(1, 2, 3, 4))])
    labels = ids.clone()
    labels[:, : config.t2i_prompt_length] = -100

    def grads():
        model.zero_grad()
        model(input_ids=ids, task="t2i", labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7)
    assert not any("vqmodel" in n for n in plain)  # the VQ tokenizer is frozen


def test_fresh_init_follows_the_original(config):
    """Spec §1.8: a fresh task adapter is a no-op (up = 0, down random), A = U[1, 16], D = 1, dt in [1e-3, 0.1]."""
    torch.manual_seed(0)
    model = OmniMambaForConditionalGeneration(config)
    for layer in model.model.language_model.layers:
        mixer = layer.mixer
        for adapter in mixer.in_proj.task_adapters.values():
            assert torch.count_nonzero(adapter.up.weight) == 0
            assert adapter.down.weight.abs().max() > 0.05  # kaiming-uniform, not the 0.02 normal default
        A = mixer.A_log.exp()
        assert bool(((A >= 1) & (A <= 16)).all()) and torch.equal(mixer.D, torch.ones_like(mixer.D))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert bool(((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all())
    assert model.model.mmu_position_embeddings.std() > 0.01


def test_full_size_parameter_count_on_meta():
    """The released 1.3B layout: the spec's unique-parameter total (§1.7) plus what the HF towers add."""
    with torch.device("meta"):
        model = OmniMambaForConditionalGeneration(OmniMambaConfig())
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in model.model.named_children()
    }
    total = sum(p.numel() for p in model.parameters())
    print("\nOmniMamba-1.3B parameters (unique):", f"{total:,}", {k: f"{v:,}" for k, v in counts.items()})
    mamba = (
        counts["language_model"] + counts["image_embeddings"] + counts["caption_mlp"]
        + model.model.mmu_position_embeddings.numel() + model.model.t2i_position_embeddings.numel()
    )  # fmt: skip
    assert mamba == 1_435_317_248  # spec §1.7 `llm_backbone.mamba` total
    assert counts["projector"] == 40_972_800
    assert counts["vqmodel"] == 71_883_403
    # transformers' DINOv2 has two tensors timm's has not: `mask_token` and the class row of its position table
    # (timm folds that row into `cls_token`); conversion writes zeros there (see conversion/vision_towers.py).
    dino = model.model.vision_model.dino.embeddings
    extra = dino.mask_token.numel() + dino.position_embeddings.shape[-1]
    assert counts["vision_model"] == 303_715_328 + 428_225_600 + extra
    assert total == 2_280_114_379 + extra


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda c: dict(input_ids=torch.tensor([mmu_ids(c)])), "no pixel_values"),
        (lambda c: dict(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=pixels()), "holds 0 image"),
        (lambda c: dict(input_ids=torch.tensor([mmu_ids(c)]), pixel_values=torch.randn(1, 3, 28, 28)), "pixel_values of shape"),
        (lambda c: dict(input_ids=torch.tensor([mmu_ids(c)]), pixel_values=torch.randn(1, 2, 3, 32, 32)), "pixel_values of shape"),
        (lambda c: dict(input_ids=torch.tensor([mmu_ids(c)[:-3]]), pixel_values=pixels()), None),
        (lambda c: dict(input_ids=torch.tensor([[5] * 70])), "past the MMU position table"),
        (lambda c: dict(input_ids=torch.tensor([[5, 6]]), position_ids=torch.tensor([[63, 64]])), "past the MMU position table"),
        (lambda c: dict(input_ids=torch.tensor([t2i_ids(c, codes=range(20))]), task="t2i"), "past the T2I position table"),
        (lambda c: dict(input_ids=torch.tensor([[5, 6]]), task="caption"), "Unknown task"),
        (lambda c: dict(input_ids=torch.tensor([[5, 10_000]])), "input_ids must be in"),
        (lambda c: dict(input_ids=torch.tensor([[c.image_token_id] * 3])), "not a multiple of num_image_tokens"),
        # OmniMambaDataCollator's output handed to the model (a plain Trainer): not silently swallowed by **kwargs
        (lambda c: dict(t2i=dict(input_ids=torch.tensor([[5, 6]]))), "per-task sub-batches"),
        (lambda c: dict(input_ids=torch.tensor([[5, 6]]), labels=torch.tensor([[5, c.text_vocab_size]])), "task='t2i'"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, config, make_inputs, message):
    inputs = make_inputs(config)
    if message is None:  # a valid prompt cut short is still valid input
        model(**inputs)
        return
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_saved_directory_loads_with_trust_remote_code_without_the_package(model, tmp_path):
    """The saved directory carries the modeling code and an auto_map: a process that cannot import omnimamba_hf loads
    it with trust_remote_code=True and computes the same logits."""
    import json
    import os
    import subprocess
    import sys

    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_omnimamba.OmniMambaForConditionalGeneration"
    assert (tmp_path / "modeling_omnimamba.py").exists() and (tmp_path / "mixer_omnimamba.py").exists()
    ids = [[5, 6, 7, 8]]
    code = f"""
import sys, builtins, torch
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] == "omnimamba_hf":
        raise ImportError("omnimamba_hf must not be needed")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
print(repr(m(input_ids=torch.tensor({ids})).logits.sum().item()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.sum().item()
    assert float(out.stdout.strip().splitlines()[-1]) == expected


def test_trailing_padding_does_not_change_real_positions(model, config):
    """Right padding without a cache is dropped from the computation: the real positions are unchanged."""
    ids = torch.tensor([mmu_ids(config, (5, 6, 7)) + [config.pad_token_id] * 3])
    mask = torch.tensor([[1] * (ids.shape[1] - 3) + [0] * 3])
    padded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(), use_cache=False).logits
    plain = model(input_ids=ids[:, :-3], pixel_values=pixels(), use_cache=False).logits
    torch.testing.assert_close(padded[:, :-3], plain, rtol=1e-5, atol=1e-5)
