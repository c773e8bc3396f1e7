"""Training tests (CPU, tiny configs): stage presets (ORIGINAL-SPEC §7.2), collator layouts (§4.3, §4.4), bad-record
handling, VQ pre-tokenisation cache (§7.5), the mixed batch sampler (§7.4), OmniMambaTrainer (both losses fall,
separate logging, resume, activation checkpointing, bf16, weight-decay groups), PEFT adapters, the CLI and the
train-step benchmark."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import make_base_tokenizer, randomize_routing_, tiny_config
from omnimamba_hf import OmniMambaForConditionalGeneration
from omnimamba_hf.processing import OmniMambaImageProcessor, OmniMambaProcessor
from omnimamba_hf.training import (
    STAGES,
    BadRecordError,
    MixedTaskBatchSampler,
    MixedTaskDataset,
    OmniMambaDataCollator,
    OmniMambaTrainer,
    OmniMambaTrainingArguments,
    apply_stage,
    build_t2i_prompt,
    export_task_adapters,
    get_omnimamba_lora_model,
    get_stage,
    import_task_adapters,
    load_coco_captions,
    load_llava_dataset,
    load_omnimamba_lora,
    load_t2i_dataset,
    load_yaml_config,
    neutralize_task_adapters,
    parse_training_args,
    prepare_mmu_dataset,
    prepare_t2i_dataset,
    pretokenize_images,
    stage_training_defaults,
    task_loss_history,
)
from omnimamba_hf.training.collators import SequenceSpec

TEXT_LEN = 48  # MMU text part in the tiny layout (4 + 4 image slots + 48 = 56 ≤ 64 position rows)
ANSWERS = ["a cat", "a dog", "seven", "a red bicycle"]


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny models are faster on one thread, and do not collapse when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def processor(config):
    return OmniMambaProcessor.from_config(config, make_base_tokenizer())


def tok(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def new_model(config, seed=0):
    torch.manual_seed(seed)
    return OmniMambaForConditionalGeneration(config)


randomize_adapters_ = randomize_routing_


def image(seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 images, a LLaVA-style fine-tuning JSON (one record per image), and a pretokenised T2I JSONL."""
    d = tmp_path_factory.mktemp("data")
    (d / "images").mkdir()
    records = []
    for i, answer in enumerate(ANSWERS):
        image(i).save(d / "images" / f"img{i}.png")
        records.append(
            {
                "id": i if i % 2 else f"r{i}",  # mixed int/str ids, as in the real LLaVA mixes
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (d / "llava.json").write_text(json.dumps(records))
    rng = np.random.default_rng(0)
    with open(d / "t2i.jsonl", "w") as f:
        for i in range(8):
            codes = rng.integers(0, 64, 16).tolist()
            f.write(json.dumps({"tokens": codes, "captions": [ANSWERS[i % 4], f"photo of {ANSWERS[i % 4]}"]}) + "\n")
    return d


@pytest.fixture(scope="module")
def datasets_(data_dir, processor, config):
    mmu = prepare_mmu_dataset(
        load_llava_dataset(str(data_dir / "llava.json")), processor, config, max_text_length=TEXT_LEN,
        image_root=str(data_dir / "images"),
    )  # fmt: skip
    t2i = prepare_t2i_dataset(load_t2i_dataset(str(data_dir / "t2i.jsonl")), config)
    return mmu, t2i


def make_trainer(config, processor, datasets_, data_dir, out_dir, seed=0, model=None, **overrides):
    mmu, t2i = datasets_
    kwargs = dict(
        output_dir=str(out_dir),
        stage="stage2",
        per_device_mmu_batch_size=2,
        per_device_t2i_batch_size=4,
        max_steps=4,
        learning_rate=3e-3,
        adam_beta2=0.95,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
    )
    kwargs.update(overrides)
    args = OmniMambaTrainingArguments(**kwargs)
    model = model if model is not None else new_model(config, seed)
    collator = OmniMambaDataCollator(config, processor, max_text_length=TEXT_LEN, mmu_format="finetune")
    dataset = MixedTaskDataset(mmu=mmu, t2i=t2i, image_root=str(data_dir / "images"))
    return OmniMambaTrainer(model, args, train_dataset=dataset, data_collator=collator, processing_class=processor)


# ---- stage presets ------------------------------------------------------------------------------------------------


def test_stage_presets_freeze_exactly_what_the_spec_says(config):
    model = new_model(config)
    names = [n for n, _ in model.named_parameters()]
    adapter = lambda n, t: f".mixer.in_proj.task_adapters.{t}." in n  # noqa: E731
    expected = {
        # §7.2 align+mmu: projector + LoRA (only the MMU adapter: the unused T2I adapter is frozen, the DDP fix)
        "stage1_mmu": {n for n in names if n.startswith("model.projector.") or adapter(n, "mmu")},
        # §7.2 align+t2i: image embeddings (+ MLP; = image head), pos table, caption MLP, text embedding (= lm_head), LoRA
        "stage1_t2i": {
            n
            for n in names
            if n.startswith(("model.image_embeddings.", "model.caption_mlp.", "model.language_model.embeddings."))
            or n == "model.t2i_position_embeddings"
            or adapter(n, "t2i")
        },
        # §7.2 finetune: everything but the vision towers and the VQ
        "stage2": {n for n in names if not n.startswith(("model.vision_model.", "model.vqmodel."))},
    }
    total = sum(p.numel() for p in model.parameters())
    for stage, want in expected.items():
        report = apply_stage(model, stage, log=False)
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        assert got == want, stage
        assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in want)
        assert report.trainable + report.frozen == total
        assert report.by_module["model.vqmodel"][0] == 0 and report.by_module["model.vision_model"][0] == 0

    apply_stage(model, "stage1_mmu", log=False)
    assert not model.model.mmu_position_embeddings.requires_grad  # stays at its random init (§7.2)
    assert not model.model.language_model.embeddings.weight.requires_grad
    block = model.model.language_model.layers[0]
    assert model.model.projector.training and block.mixer.in_proj.adapter_dropout.training
    assert not model.model.vision_model.training and not block.norm.training and not model.model.caption_mlp.training

    apply_stage(model, "stage1_t2i", log=False)
    assert model.lm_head.weight.requires_grad and model.image_head.weight.requires_grad  # tied to trained tables
    assert not model.model.projector.weight.requires_grad if hasattr(model.model.projector, "weight") else True
    assert model.model.image_embeddings.training and not model.model.projector.training

    apply_stage(model, "stage2", log=False)
    assert model.training and not model.model.vision_model.training and not model.model.vqmodel.training
    assert model.model.language_model.training

    # the original's hyper-parameters (§7.1, §7.3)
    d2, d1m, d1t = (stage_training_defaults(s) for s in ("stage2", "stage1_mmu", "stage1_t2i"))
    assert (d2["learning_rate"], d2["max_steps"], d2["warmup_steps"]) == (1e-4, 150000, 0)
    assert (d2["per_device_t2i_batch_size"], d2["per_device_mmu_batch_size"]) == (48, 3)
    assert (d1m["learning_rate"], d1m["per_device_mmu_batch_size"], d1m["per_device_t2i_batch_size"]) == (1e-3, 32, 0)
    assert (d1t["learning_rate"], d1t["per_device_t2i_batch_size"], d1t["warmup_steps"]) == (8e-4, 90, 1000)
    assert d2["adam_beta2"] == 0.95 and d2["lr_scheduler_kwargs"] == {"min_lr_rate": 0.01} and d2["weight_decay"] == 0
    assert set(STAGES) == {"stage1_mmu", "stage1_t2i", "stage2"} and get_stage("2").name == "stage2"
    with pytest.raises(ValueError, match="Unknown training stage"):
        get_stage("stage3")


def test_stage_initialisation_helpers(config):
    from omnimamba_hf.training import load_mamba2_text_weights, merge_stage_checkpoints

    # stage 1 starts from a Mamba-2 LM (mamba_ssm key layout), spec §1.8
    donor, target = new_model(config, seed=1), new_model(config, seed=2)
    lm = {k: v for k, v in donor.state_dict().items() if k.startswith("model.language_model.") and "task_adapters" not in k}
    mamba = {k.replace("model.language_model.", "backbone.").replace("backbone.embeddings.", "backbone.embedding."): v for k, v in lm.items()}
    mamba["lm_head.weight"] = mamba["backbone.embedding.weight"]
    adapters_before = {k: v.clone() for k, v in target.state_dict().items() if "task_adapters" in k}
    assert len(load_mamba2_text_weights(target, mamba)) == len(lm)
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in lm.items())
    assert all(torch.equal(state[k], v) for k, v in adapters_before.items())  # adapters keep their init
    del mamba["backbone.norm_f.weight"]
    with pytest.raises(ValueError, match="norm_f"):
        load_mamba2_text_weights(target, mamba)

    # stage 2 starts from the two stage-1 results (spec §7.6): each contributes what its stage trained
    mmu_run, t2i_run, base = new_model(config, seed=3), new_model(config, seed=4), new_model(config, seed=5)
    counts = merge_stage_checkpoints(base, {"stage1_mmu": mmu_run, "stage1_t2i": t2i_run})
    assert counts["stage1_mmu"] > 0 and counts["stage1_t2i"] > 0
    merged = base.state_dict()
    assert torch.equal(merged["model.projector.linear_1.weight"], mmu_run.state_dict()["model.projector.linear_1.weight"])
    key = "model.language_model.layers.0.mixer.in_proj.task_adapters.t2i.down.weight"
    assert torch.equal(merged[key], t2i_run.state_dict()[key])
    assert torch.equal(merged["lm_head.weight"], t2i_run.state_dict()["model.language_model.embeddings.weight"])
    assert torch.equal(merged["model.vision_model.dino.embeddings.cls_token"], new_model(config, seed=5).state_dict()["model.vision_model.dino.embeddings.cls_token"])


# ---- collators ----------------------------------------------------------------------------------------------------


def mmu_prefix(c):
    return [c.mmu_token_id, c.soi_token_id] + [c.image_token_id] * c.num_image_tokens + [c.eoi_token_id, c.sot_token_id]


def pad(ids, labels, c, n=TEXT_LEN):
    return ids + [c.pad_token_id] * (n - len(ids)), labels + [-100] * (n - len(labels))


def test_finetune_collator_matches_the_hand_built_layout(config, processor):
    c = config
    conv = [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "And?"},
        {"from": "gpt", "value": ""},  # an empty answer becomes " " (MambaPromptBuilder)
    ]
    h1, g1 = tok(processor, "In: What is shown?\nOut: "), tok(processor, "a cat<|endoftext|>")
    h2, g2 = tok(processor, "\nIn: And?\nOut: "), tok(processor, " <|endoftext|>")
    text = h1 + g1 + h2 + g2 + [c.eot_token_id]  # <|eot|> appended, unsupervised (§4.3, §8 #7)
    labels = [-100] * len(h1) + g1 + [-100] * len(h2) + g2 + [-100]
    assert len(text) <= TEXT_LEN and g1[-1] == 0  # <|endoftext|> is id 0
    text, labels = pad(text, labels, c)

    img = image(0)
    collator = OmniMambaDataCollator(c, processor, mmu_format="finetune", max_text_length=TEXT_LEN)
    batch = collator([{"task": "mmu", "image": img, "conversations": conv}])
    assert set(batch) == {"mmu"}
    mmu = batch["mmu"]
    assert mmu["input_ids"][0].tolist() == mmu_prefix(c) + text
    assert mmu["labels"][0].tolist() == [-100] * len(mmu_prefix(c)) + labels
    assert mmu["image_flags"].tolist() == [True]
    torch.testing.assert_close(mmu["pixel_values"], processor.image_processor([img], return_tensors="pt")["pixel_values"])
    # the same text as the processor's training chat template (which tokenises the string in one piece)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
    ]
    rendered = processor.apply_chat_template(messages, prompt_format="train")
    ours = processor.tokenizer.decode([i for i in text if i != c.pad_token_id])
    assert rendered == "<|mmu|><image><|sot|>" + ours

    # a turn that does not fit ends the conversation (later turns dropped); the eot still closes it
    long_turn = {"from": "human", "value": "The quick brown fox jumps over the lazy dog. " * 6}
    trunc = collator([{"task": "mmu", "image": img, "conversations": conv[:2] + [long_turn, conv[1]]}])["mmu"]
    assert trunc["input_ids"][0].tolist() == mmu_prefix(c) + pad(h1 + g1 + [c.eot_token_id], [], c)[0]
    # an over-long first turn leaves nothing to learn: a bad record, not a silent all-ignored sample
    with pytest.raises(BadRecordError, match="no supervised token"):
        collator([{"task": "mmu", "image": img, "conversations": [long_turn, conv[1]]}])

    # a text-only record: zero image features (image_flags False, no pixel_values), the model still trains on it
    text_only = collator([{"task": "mmu", "image": None, "conversations": conv[:2]}])["mmu"]
    assert text_only["image_flags"].tolist() == [False] and "pixel_values" not in text_only
    loss = new_model(c)(**text_only, task="mmu").loss
    assert torch.isfinite(loss)


def test_align_collator_matches_the_hand_built_layout(config, processor):
    c = config
    collator = OmniMambaDataCollator(c, processor, mmu_format="align", max_text_length=TEXT_LEN)
    conv = [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "  a cat sitting next to a dog "}]
    ids = tok(processor, "a cat sitting next to a dog<|endoftext|>")
    want_ids, want_labels = pad(ids, list(ids), c)  # caption + <|endoftext|>, all supervised, no <|eot|>
    mmu = collator([{"task": "mmu", "image": image(1), "conversations": conv}])["mmu"]
    assert mmu["input_ids"][0].tolist() == mmu_prefix(c) + want_ids
    assert mmu["labels"][0].tolist() == [-100] * len(mmu_prefix(c)) + want_labels
    long = [conv[0], {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog. " * 8}]
    cut = collator([{"task": "mmu", "image": image(1), "conversations": long}])["mmu"]
    full = tok(processor, long[1]["value"].strip() + "<|endoftext|>")
    assert cut["input_ids"][0, -TEXT_LEN:].tolist() == full[:TEXT_LEN] == cut["labels"][0, -TEXT_LEN:].tolist()

def test_data_prepared_for_one_format_is_refused_by_the_other(config, processor, data_dir):
    # stage 1 (align) trains on captions, stage 2 (finetune) on conversations: pre-tokenised text must match
    raw = load_llava_dataset(str(data_dir / "llava.json"))
    root = str(data_dir / "images")
    for prepared_as, collated_as in (("finetune", "align"), ("align", "finetune")):
        data = prepare_mmu_dataset(raw, processor, config, mmu_format=prepared_as, max_text_length=TEXT_LEN, image_root=root)
        record = {"task": "mmu", **data[0]}
        ok = OmniMambaDataCollator(config, processor, mmu_format=prepared_as, max_text_length=TEXT_LEN, image_root=root)
        assert ok([record])["mmu"]["input_ids"].shape[0] == 1
        wrong = OmniMambaDataCollator(config, processor, mmu_format=collated_as, max_text_length=TEXT_LEN, image_root=root)
        with pytest.raises(ValueError, match=f"tokenised for mmu_format='{prepared_as}'"):
            wrong([record])



def test_t2i_collator_matches_the_hand_built_layout(config, processor):
    c = config
    V = c.text_vocab_size
    codes = list(range(3, 19))
    collator = OmniMambaDataCollator(c, processor, max_text_length=TEXT_LEN)
    record = {"task": "t2i", "tokens": codes, "captions": ["a red bicycle", "a cat"], "_draw": 7}  # 7 % 2 -> "a cat"
    ids = tok(processor, "a cat")
    slots = [c.pad_token_id] * (c.t2i_caption_length - len(ids)) + ids  # left-padded caption slots (§4.4)
    want = [c.t2i_token_id, c.sot_token_id, *slots, c.eot_token_id, c.soi_token_id] + [V + k for k in codes]
    want.append(c.eoi_token_id)
    t2i = collator([record])["t2i"]
    assert t2i["input_ids"][0].tolist() == want and len(want) == c.t2i_max_position_embeddings
    assert t2i["labels"][0].tolist() == [-100] * (c.t2i_caption_length + 4) + [V + k for k in codes] + [-100]
    # the prompt is the processor's T2I prompt; long captions keep their first tokens (§8 #21)
    spec = SequenceSpec.from_config(c, max_text_length=TEXT_LEN)
    long = "The quick brown fox jumps over the lazy dog."
    with pytest.warns(UserWarning):
        expected = processor(text=[long], generation_mode="image")["input_ids"][0].tolist()
    assert build_t2i_prompt(tok(processor, long), spec) == expected
    assert tok(processor, long)[: c.t2i_caption_length] == expected[2 : 2 + c.t2i_caption_length]
    # mixed batch: both sub-batches, in one call
    both_records = [record, {"task": "mmu", "image": None, "input_ids": [5, 6], "labels": [5, 6]}]
    both = collator(both_records)
    assert set(both) == {"mmu", "t2i"} and both["mmu"]["input_ids"].shape == (1, 4 + c.num_image_tokens + TEXT_LEN)
    with pytest.raises(ValueError, match="past the 64-row MMU position table"):
        OmniMambaDataCollator(c, processor)([both_records[1]])  # 449 text ids do not fit the tiny position table


def test_bad_records_are_counted_or_raise(config, processor, data_dir, tmp_path, caplog):
    import datasets

    good = {"image": "img0.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "a cat"}]}
    bad = [
        {**good, "image": "missing.png"},
        {**good, "conversations": []},
        {**good, "conversations": [{"from": "human", "value": "The lazy dog. " * 20}, {"from": "gpt", "value": "a"}]},
        {**good, "conversations": [{"from": "gpt", "value": "a cat"}, {"from": "human", "value": "What?"}]},
        {**good, "image": None},
    ]
    ds = datasets.Dataset.from_list([good] + bad)
    kw = dict(max_text_length=TEXT_LEN, image_root=str(data_dir / "images"))
    with caplog.at_level(logging.WARNING):
        kept = prepare_mmu_dataset(ds, processor, config, **kw)
    assert len(kept) == 1 and kept[0]["image"] == "img0.png"
    log = caplog.text
    assert "skipping 5 of 6 records" in log
    for reason in ("missing image file", "empty conversation", "no supervised token", "malformed conversation", "no image"):
        assert reason in log
    assert len(prepare_mmu_dataset(ds, processor, config, keep_text_only=True, **kw)) == 2
    with pytest.raises(BadRecordError, match="5 of 6 records are unusable"):
        prepare_mmu_dataset(ds, processor, config, on_bad_record="raise", **kw)
    with pytest.raises(BadRecordError, match="all 5 records are unusable"):
        prepare_mmu_dataset(datasets.Dataset.from_list(bad), processor, config, **kw)
    # multi-image LLaVA records: named as such, not as a missing file
    several = datasets.Dataset.from_list([{**good, "image": ["img0.png"]}, {**good, "image": ["img0.png", "img1.png"]}])
    with pytest.raises(BadRecordError, match="a list of images"):
        prepare_mmu_dataset(several, processor, config, **kw)

    # T2I: wrong number of codes, no caption
    t2i = datasets.Dataset.from_list(
        [
            {"tokens": list(range(16)), "captions": ["a cat", ""]},
            {"tokens": list(range(15)), "captions": ["a cat"]},
            {"tokens": list(range(16)), "captions": [""]},
        ]
    )
    with caplog.at_level(logging.WARNING):
        kept = prepare_t2i_dataset(t2i, config)
    assert len(kept) == 1 and kept[0]["captions"] == ["a cat"]
    assert "skipping 2 of 3" in caplog.text and "1 empty captions removed" in caplog.text
    # codes read as floats (e.g. from a CSV): whole numbers are codes, anything else is not truncated into one
    floats = datasets.Dataset.from_list([{"tokens": [float(k) for k in range(16)], "captions": ["a cat"]},
                                         {"tokens": [3.5] + [1.0] * 15, "captions": ["a dog"]}])  # fmt: skip
    with pytest.raises(BadRecordError, match="image tokens not integer codes"):
        prepare_t2i_dataset(floats, config, on_bad_record="raise")
    assert len(prepare_t2i_dataset(floats, config)) == 1

    # at run time: an image that exists but cannot be decoded
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    image_dir = str(data_dir / "images")
    records = [{"image": str(tmp_path / "corrupt.png"), "input_ids": [1], "labels": [1]}, {"image": "img1.png", "input_ids": [2], "labels": [2]}]
    skip = MixedTaskDataset(mmu=records, image_root=image_dir)
    item = skip[0]
    assert item["input_ids"] == [2] and isinstance(item["image"], Image.Image) and skip.num_substituted == 1
    assert MixedTaskDataset(mmu=records, image_root=image_dir, on_bad_record="text_only")[0]["image"] is None
    with pytest.raises(BadRecordError, match="corrupt.png"):
        MixedTaskDataset(mmu=records, image_root=image_dir, on_bad_record="raise")[0]


def test_vq_pretokenization_with_datasets_map_is_cached(config, data_dir, tmp_path, caplog):
    coco = {
        "images": [{"id": 7, "file_name": "img1.png"}, {"id": 3, "file_name": "img0.png"}, {"id": 9, "file_name": "gone.png"}],
        "annotations": [
            {"image_id": 3, "caption": "a cat"},
            {"image_id": 7, "caption": "a dog"},
            {"image_id": 3, "caption": "a small cat"},
            {"image_id": 9, "caption": "nothing"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    raw = load_coco_captions(str(tmp_path / "captions.json"), str(data_dir / "images"))
    assert raw["captions"] == [["a cat", "a small cat"], ["a dog"], ["nothing"]]  # sorted image ids
    vq = new_model(config).model.vqmodel
    cache = str(tmp_path / "vq_tokens.arrow")
    with caplog.at_level(logging.WARNING):
        ds = pretokenize_images(raw, vq, cache_file_name=cache)
    assert "1 missing image file" in caplog.text
    pixels = OmniMambaImageProcessor().preprocess_for_vq([image(0), image(1)], size=vq.config.image_size)
    assert ds["tokens"] == vq.encode_to_codes(pixels).tolist()
    assert ds["captions"] == [["a cat", "a small cat"], ["a dog"]] and "image" not in ds.column_names
    assert os.path.exists(cache)

    def fail(*args, **kwargs):
        raise AssertionError("the VQ ran again instead of reading the cache")

    vq.encode_to_codes = fail
    assert pretokenize_images(raw, vq, cache_file_name=cache)["tokens"] == ds["tokens"]
    # the result is valid T2I data
    assert len(prepare_t2i_dataset(ds, config)) == 2


# ---- sampler ------------------------------------------------------------------------------------------------------


def test_mixed_batch_sampler_ratio_cycling_determinism_and_sharding():
    from accelerate.data_loader import BatchSamplerShard

    s = MixedTaskBatchSampler({"mmu": 7, "t2i": 20}, {"mmu": 3, "t2i": 6}, seed=1)
    batches = list(s)
    assert len(s) == len(batches) == 4  # max_size_cycle: the longer (T2I) stream, its last batch partial
    for b in batches:
        assert sum(1 for t, _, _ in b if t == 0) == 3  # MMU count per batch is constant (drop_last, cycled)
    t2i_rows = [r for b in batches for t, r, _ in b if t == 1]
    assert sorted(t2i_rows) == list(range(20)) and [len(b) for b in batches] == [9, 9, 9, 5]
    assert batches == list(s)  # deterministic in (seed, epoch)
    s.set_epoch(1)
    assert list(s) != batches
    assert len(MixedTaskBatchSampler({"mmu": 7, "t2i": 20}, {"mmu": 3, "t2i": 6}, drop_last=True)) == 3
    longer_mmu = MixedTaskBatchSampler({"mmu": 30, "t2i": 12}, {"mmu": 3, "t2i": 6})
    assert len(longer_mmu) == 10 and all(len(b) == 9 for b in longer_mmu)  # the T2I stream restarts
    one_pass = MixedTaskBatchSampler({"mmu": 30, "t2i": 12}, {"mmu": 3, "t2i": 6}, shuffle=False, cycle=False)
    assert [len(b) for b in one_pass] == [9, 9] + [3] * 8
    # accelerate hands whole mixed batches to each process
    shards = [list(BatchSamplerShard(MixedTaskBatchSampler({"mmu": 8, "t2i": 16}, {"mmu": 2, "t2i": 4}), 2, i)) for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    seen = [tuple(x[:2]) for shard in shards for b in shard for x in b]
    assert len(seen) == len(set(seen)) == 24
    with pytest.raises(ValueError, match="cannot fill one batch"):
        MixedTaskBatchSampler({"mmu": 2, "t2i": 8}, {"mmu": 3, "t2i": 4})
    with pytest.raises(ValueError, match="no t2i data"):
        MixedTaskBatchSampler({"mmu": 8}, {"mmu": 2, "t2i": 4})
    # epochs also reach the sampler through the dataset (accelerate's fallback when wrappers hide the sampler)
    dataset = MixedTaskDataset(mmu=[{"image": None}] * 8, t2i=[{"tokens": []}] * 16)
    sampler = MixedTaskBatchSampler(dataset.task_sizes, {"mmu": 2, "t2i": 4})
    dataset.attach_sampler(sampler)
    dataset.set_epoch(3)
    assert sampler.epoch == 3


# ---- trainer ------------------------------------------------------------------------------------------------------


def test_training_reduces_both_losses_and_logs_them_separately(config, processor, datasets_, data_dir, tmp_path):
    trainer = make_trainer(config, processor, datasets_, data_dir, tmp_path, max_steps=30)
    model = trainer.model
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("model.vision_model", "model.vqmodel"))}
    trainer.train()
    history = task_loss_history(trainer.state.log_history)
    assert len(history["loss"]) == 30
    for total, mmu, t2i in zip(history["loss"], history["loss_mmu"], history["loss_t2i"]):
        assert math.isclose(total, mmu + t2i, rel_tol=1e-4)  # loss = loss_mmu + loss_t2i, both per-task token means
    for key in ("loss_mmu", "loss_t2i"):
        first, last = np.mean(history[key][:3]), np.mean(history[key][-3:])
        assert last < 0.85 * first, (key, history[key])
    # the stage preset held through model.train() calls: towers and VQ untouched and in eval mode
    assert not model.model.vision_model.training and not model.model.vqmodel.training
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert trainer.stage_report.trainable < trainer.stage_report.frozen
    assert model.config.bos_token_id is None and model.generation_config.bos_token_id is None  # not "aligned" to 0
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)  # one pass over each stream, no cycling
    assert {"eval_loss", "eval_loss_mmu", "eval_loss_t2i"} <= set(metrics)
    assert metrics["eval_loss_mmu"] < history["loss_mmu"][0] and metrics["eval_loss_t2i"] < history["loss_t2i"][0]
    # the eval loss is the training loss's definition (sum of the task means), not Trainer's mean over batches, which
    # weights the tasks by batch count when the streams are unequal: here one MMU batch against two T2I ones
    mmu, t2i = datasets_
    uneven = MixedTaskDataset(mmu=mmu.select(range(2)), t2i=t2i, image_root=str(data_dir / "images"))
    assert len(t2i) >= 2 * 4  # two T2I batches of 4, one MMU batch
    metrics = trainer.evaluate(eval_dataset=uneven)
    assert math.isclose(metrics["eval_loss"], metrics["eval_loss_mmu"] + metrics["eval_loss_t2i"], rel_tol=1e-5)

    # weight decay groups: matrices decayed; A_log, D, dt_bias, norms, biases, position tables not
    decay = set(trainer.get_decay_parameter_names(model))
    mixer = "model.language_model.layers.0.mixer."
    for name in (mixer + "in_proj.weight", mixer + "out_proj.weight", mixer + "conv1d.weight", "model.projector.linear_1.weight",
                 "model.language_model.embeddings.weight", mixer + "in_proj.task_adapters.mmu.up.weight"):  # fmt: skip
        assert name in decay, name
    for name in (mixer + "A_log", mixer + "D", mixer + "dt_bias", mixer + "norm.weight", mixer + "conv1d.bias",
                 "model.language_model.layers.0.norm.weight", "model.language_model.norm_f.weight",
                 "model.projector.linear_1.bias", "model.mmu_position_embeddings", "model.t2i_position_embeddings"):  # fmt: skip
        assert name not in decay, name


def test_default_collator_follows_max_text_length(config, processor, datasets_, data_dir, tmp_path):
    """Without a data_collator the trainer builds one for the model's layout, with the MMU text length asked for
    (the tiny layout's 48 here, not the original's 449), and trains on it."""
    mmu, t2i = datasets_
    args = OmniMambaTrainingArguments(
        output_dir=str(tmp_path), stage="stage2", per_device_mmu_batch_size=2, per_device_t2i_batch_size=2, max_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    dataset = MixedTaskDataset(mmu=mmu, t2i=t2i, image_root=str(data_dir / "images"))
    trainer = OmniMambaTrainer(
        new_model(config), args, train_dataset=dataset, processing_class=processor, max_text_length=TEXT_LEN
    )
    assert trainer.data_collator.spec.max_text_length == TEXT_LEN
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["mmu"]["input_ids"].shape[1] == 4 + config.num_image_tokens + TEXT_LEN  # the tiny layout
    assert math.isfinite(trainer.train().training_loss)


def test_resume_reproduces_the_loss_trajectory(config, processor, datasets_, data_dir, tmp_path):
    common = dict(max_steps=5, gradient_accumulation_steps=2, per_device_mmu_batch_size=1, per_device_t2i_batch_size=2)
    first = make_trainer(config, processor, datasets_, data_dir, tmp_path / "a", save_strategy="steps", save_steps=2, **common)
    first.train()
    full = [e for e in first.state.log_history if "loss" in e]
    assert os.path.isdir(tmp_path / "a" / "checkpoint-2")

    other_init = new_model(config, seed=1)  # the checkpoint must restore every weight (data order follows args.seed)
    resumed = make_trainer(config, processor, datasets_, data_dir, tmp_path / "b", model=other_init, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
    assert [e["step"] for e in after] == [3, 4, 5]  # epoch 0 ends at step 3: the resume crosses an epoch boundary
    for a, b in zip(full[2:], after):
        for key in ("loss", "loss_mmu", "loss_t2i"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a, b)


def test_activation_checkpointing_matches_and_bf16_trains(config, processor, datasets_, data_dir, tmp_path):
    plain = make_trainer(config, processor, datasets_, data_dir, tmp_path / "p", max_steps=2)
    plain.train()
    ckpt = make_trainer(config, processor, datasets_, data_dir, tmp_path / "c", max_steps=2, activation_checkpointing=True)
    ckpt.train()
    for a, b in zip(task_loss_history(plain.state.log_history)["loss"], task_loss_history(ckpt.state.log_history)["loss"]):
        assert math.isclose(a, b, rel_tol=1e-5)
    bf16 = make_trainer(config, processor, datasets_, data_dir, tmp_path / "b", max_steps=2, bf16=True)
    bf16.train()
    history = task_loss_history(bf16.state.log_history)
    assert all(math.isfinite(x) for key in ("loss_mmu", "loss_t2i") for x in history[key])
    assert bf16.model.dtype == torch.float32  # autocast: fp32 master weights, as the original


def test_torch_compile_trains_like_eager(config, processor, datasets_, data_dir, tmp_path, monkeypatch):
    """`torch_compile=True` (inductor) trains, with the same losses and gradient norms as eager. Adapter dropout is
    off: inductor draws its own random numbers. Without the static-shape setting of OmniMambaTrainingArguments the
    compiled backward crashed at the second sequence length."""
    monkeypatch.delenv("ACCELERATE_DYNAMO_USE_DYNAMIC", raising=False)
    cfg = copy.deepcopy(config)
    cfg.task_lora_dropout = 0.0
    logs = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        trainer = make_trainer(cfg, processor, datasets_, data_dir, tmp_path / name, max_steps=3, torch_compile=compile_)
        trainer.train()
        logs.append([e for e in trainer.state.log_history if "loss" in e])
    assert os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] == "False"
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        for key in ("loss", "loss_mmu", "loss_t2i", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a, b)


# ---- PEFT ---------------------------------------------------------------------------------------------------------


def test_user_lora_trains_saves_and_round_trips(config, processor, datasets_, data_dir, tmp_path):
    base_state = {n: p.detach().clone() for n, p in new_model(config).named_parameters()}
    peft_model = get_omnimamba_lora_model(new_model(config), r=4, lora_alpha=8)
    targeted = peft_model.base_model.targeted_module_names
    assert len(targeted) == config.text_config.num_hidden_layers and all(t.endswith("mixer.in_proj") for t in targeted)
    with pytest.raises(ValueError, match="PEFT model never saves"):  # a stage would train base weights lost at save
        make_trainer(config, processor, datasets_, data_dir, tmp_path / "run", model=peft_model, max_steps=3)
    trainer = make_trainer(config, processor, datasets_, data_dir, tmp_path / "run", model=peft_model, stage=None, max_steps=3)
    assert trainer.stage is None
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    base = peft_model.get_base_model()
    for n, p in base.named_parameters():  # only the LoRA moved; the base, task adapters included, is frozen
        if "lora_" not in n:
            assert torch.equal(p, base_state[n.replace(".base_layer", "")]), n

    peft_model.eval()
    batch = OmniMambaDataCollator(config, processor, max_text_length=TEXT_LEN)(
        [{"task": "mmu", "image": image(0), "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "a cat"}]}]
    )["mmu"]
    reloaded = load_omnimamba_lora(new_model(config), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = peft_model(**batch, task="mmu").logits
        torch.testing.assert_close(reloaded(**batch, task="mmu").logits, want)
        assert not torch.allclose(new_model(config).eval()(**batch, task="mmu").logits, want)

    # targets the fused/kernel paths would bypass are refused, and the model is given back unmodified
    victim = new_model(config)
    with pytest.raises(ValueError, match="conv1d"):
        get_omnimamba_lora_model(victim, target_modules=["conv1d"])
    assert not any("lora_" in n for n, _ in victim.named_parameters())
    with pytest.raises(ValueError, match="out_proj"):
        get_omnimamba_lora_model(new_model(config), target_modules=r".*mixer\.(in_proj|out_proj)")
    with pytest.raises(ValueError, match="MultiheadAttention"):  # SigLIP's (unused) pooling head
        get_omnimamba_lora_model(new_model(config), target_modules=["out_proj"], allow_out_proj=True)
    ok = get_omnimamba_lora_model(new_model(config), target_modules=r".*mixer\.(in_proj|out_proj)", allow_out_proj=True)
    assert len(ok.base_model.targeted_module_names) == 2 * config.text_config.num_hidden_layers


def test_task_adapters_export_as_two_named_peft_adapters(config, processor, tmp_path):
    from peft import PeftModel

    model = randomize_adapters_(new_model(config)).eval()
    folders = export_task_adapters(model, str(tmp_path))
    assert set(folders) == {"mmu", "t2i"}
    collator = OmniMambaDataCollator(config, processor, max_text_length=TEXT_LEN)
    batch = collator(
        [
            {"task": "mmu", "image": image(2), "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "a dog"}]},
            {"task": "t2i", "tokens": list(range(16)), "captions": ["a cat"]},
        ]
    )
    with torch.no_grad():
        want = {t: model(**batch[t], task=t).logits for t in ("mmu", "t2i")}
    plain = copy.deepcopy(model)
    neutralize_task_adapters(plain)
    peft_model = PeftModel.from_pretrained(plain, folders["mmu"], adapter_name="mmu")
    peft_model.load_adapter(folders["t2i"], adapter_name="t2i")
    peft_model.eval()
    with torch.no_grad():
        for task in ("mmu", "t2i"):
            peft_model.set_adapter(task)
            torch.testing.assert_close(peft_model(**batch[task], task=task).logits, want[task])
        assert not torch.allclose(plain(**batch["mmu"], task="mmu").logits, want["mmu"])  # neutral without PEFT
    # and back into the built-in adapters
    back = copy.deepcopy(model)
    neutralize_task_adapters(back)
    for task in ("mmu", "t2i"):
        import_task_adapters(back, folders[task], task)
    with torch.no_grad():
        for task in ("mmu", "t2i"):
            torch.testing.assert_close(back(**batch[task], task=task).logits, want[task])


# ---- configuration and CLI ----------------------------------------------------------------------------------------


def test_config_precedence_and_original_yaml(tmp_path, caplog):
    model_args, data_args, args = parse_training_args(["--stage", "stage1_t2i", "--output_dir", str(tmp_path)])
    assert args.stage == "stage1_t2i" and args.learning_rate == 8e-4 and args.warmup_steps == 1000
    assert (args.per_device_t2i_batch_size, args.per_device_mmu_batch_size, args.per_device_train_batch_size) == (90, 0, 90)
    assert args.adam_beta2 == 0.95 and args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.bf16 == torch.cuda.is_available()  # the original's bf16 on GPU; fp32 on a CPU-only machine
    # the original's stage-2 YAML (config/config_stage2.yaml), its `train:` keys translated
    (tmp_path / "orig.yaml").write_text(
        "accelerate:\n  mixed_precision: bf16\n  num_processes: 8\n"
        "train:\n  omnimamba_model: OmniMamba-1.3B\n  dataset: datasets/pretokenized_coco_train2014.jsonl\n"
        "  stage: finetune\n  t2i_task: True\n  mmu_task: True\n  batch_size_t2i: 48\n  batch_size_mmu: 3\n"
        "  lr: 1e-4\n  max_steps: 150000\n  warmup_steps: 0\n  output_dir: logs/\n  logging_steps: 500\n  bf16: False\n"
    )
    values = load_yaml_config(str(tmp_path / "orig.yaml"))
    assert values["stage"] == "stage2" and values["per_device_t2i_batch_size"] == 48 and values["learning_rate"] == "1e-4"
    _, data_args, args = parse_training_args(["--config", str(tmp_path / "orig.yaml"), "--max_steps", "7"])
    assert args.max_steps == 7 and args.learning_rate == 1e-4 and data_args.t2i_data.endswith("train2014.jsonl")
    assert args.task_batch_sizes == {"mmu": 3, "t2i": 48}
    with caplog.at_level("WARNING", logger="omnimamba_hf.training"):  # flags the stage would override say so
        args = parse_training_args(["--stage", "stage1_t2i", "--per_device_mmu_batch_size", "8",
                                    "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)])[2]  # fmt: skip
    assert args.per_device_mmu_batch_size == 0 and args.per_device_train_batch_size == 90
    assert "per_device_mmu_batch_size=8 is ignored" in caplog.text and "per_device_train_batch_size=4 is replaced" in caplog.text
    with pytest.raises(SystemExit):  # argparse names the valid choices
        parse_training_args(["--dtype", "bf16", "--output_dir", str(tmp_path)])
    assert parse_training_args(["--dtype", "auto", "--output_dir", str(tmp_path)])[0].dtype == "auto"
    # `--stage none` clears the YAML's stage (no preset hyper-parameters, requires_grad as loaded)
    _, _, args = parse_training_args(["--config", str(tmp_path / "orig.yaml"), "--stage", "none"])
    assert args.stage is None and args.adam_beta2 == 0.999
    (tmp_path / "bad.yaml").write_text("stage: stage2\nlearning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_training_args(["--config", str(tmp_path / "bad.yaml")])


@pytest.fixture(scope="module")
def run_yaml(config, processor, data_dir, tmp_path_factory):
    """A stage-2 YAML config for the CLI: tiny model config + saved processor + the fixture data."""
    d = tmp_path_factory.mktemp("cli")
    config.save_pretrained(d / "config")
    processor.save_pretrained(d / "processor")
    (d / "run.yaml").write_text(
        f"model:\n  config_name: {d / 'config'}\n  processor_name_or_path: {d / 'processor'}\n"
        f"data:\n  mmu_data: {data_dir / 'llava.json'}\n  mmu_image_root: {data_dir / 'images'}\n"
        f"  t2i_data: {data_dir / 't2i.jsonl'}\n  max_text_length: {TEXT_LEN}\n"
        f"training:\n  stage: stage2\n  output_dir: {d / 'out'}\n  per_device_mmu_batch_size: 2\n"
        "  per_device_t2i_batch_size: 4\n  max_steps: 2\n  logging_steps: 1\n  save_strategy: 'no'\n  bf16: false\n"
        "  use_cpu: true\n  report_to: none\n  disable_tqdm: true\n"
    )
    return d / "run.yaml"


def read_log(out_dir):
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


def test_cli_trains_a_stage_end_to_end(config, run_yaml, tmp_path):
    from omnimamba_hf.cli import main  # `omnimamba-hf train ...`, as a user runs it

    out = tmp_path / "out"
    assert main(["train", "--config", str(run_yaml), "--learning_rate", "1e-3", "--output_dir", str(out)]) == 0
    train_logs = read_log(out)
    assert len(train_logs) == 2 and all("loss_mmu" in e and "loss_t2i" in e for e in train_logs)
    assert train_logs[0]["learning_rate"] == pytest.approx(1e-3, rel=0.05)  # the command line beats the stage default
    report = json.loads((out / "stage_report.json").read_text())
    assert report["stage"] == "stage2" and report["by_module"]["model.vision_model"]["trainable"] == 0
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()
    reloaded = OmniMambaForConditionalGeneration.from_pretrained(out)
    assert reloaded.config.text_vocab_size == config.text_vocab_size


def test_cli_evaluates_during_training(run_yaml, data_dir, tmp_path):
    from omnimamba_hf.cli import main

    common = ["train", "--config", str(run_yaml), "--eval_strategy", "steps", "--eval_steps", "1"]
    with pytest.raises(ValueError, match="--eval_mmu_data"):  # not Trainer's error about a missing eval_dataset
        main(common + ["--output_dir", str(tmp_path / "none")])
    out = tmp_path / "eval"
    eval_data = ["--eval_mmu_data", str(data_dir / "llava.json"), "--eval_t2i_data", str(data_dir / "t2i.jsonl")]
    assert main(common + eval_data + ["--output_dir", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in lines if "eval_loss" in e]
    assert len(evals) == 2  # after each of the 2 steps
    for e in evals:
        assert math.isclose(e["eval_loss"], e["eval_loss_mmu"] + e["eval_loss_t2i"], rel_tol=1e-5)


def test_ddp_on_two_cpu_processes_trains_and_resumes(run_yaml, tmp_path):
    """torchrun + gloo: every process gets its own mixed batches, two forwards + one backward under DDP
    (find_unused_parameters=False), per-task losses reduced over processes, and a mid-epoch resume."""
    import subprocess

    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import sys\nfrom omnimamba_hf.training.cli import end_distributed, train_main\n"
        "cfg, out = sys.argv[1], sys.argv[2]\n"
        "common = ['--config', cfg, '--max_steps', '5', '--logging_steps', '1', '--dataloader_num_workers', '1',\n"
        "          '--per_device_mmu_batch_size', '1', '--per_device_t2i_batch_size', '2']\n"
        "train_main(common + ['--output_dir', out + '/a', '--save_strategy', 'steps', '--save_steps', '3'])\n"
        "train_main(common + ['--output_dir', out + '/b', '--resume_from_checkpoint', out + '/a/checkpoint-3'])\n"
        "end_distributed()\n"  # without it, gloo's teardown at exit aborted a finished process (seen once in CI)
    )
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(run_yaml), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    full, resumed = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [e["step"] for e in full] == [1, 2, 3, 4, 5] and [e["step"] for e in resumed] == [4, 5]
    for a, b in zip(full[3:], resumed):  # 4 batches of 1 MMU + 2 T2I per epoch, 2 per process: step 4 is mid-epoch
        for key in ("loss", "loss_mmu", "loss_t2i", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)


def test_train_step_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "train_step_benchmark.py")
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step_benchmark"] = module
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--steps", "2", "--warmup", "1", "--output", str(tmp_path / "r.json")])
    assert result["timed_steps"] == 2 and result["steps_per_second"] > 0
    assert len(result["loss_mmu"]) == len(result["loss_t2i"]) == 3
    assert json.loads((tmp_path / "r.json").read_text())["batch_per_step"] == {"mmu": 2, "t2i": 4}
