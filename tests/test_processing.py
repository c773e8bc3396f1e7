"""Processing tests (CPU, offline): tokenizer ids (ORIGINAL-SPEC §1.4), MMU/T2I layouts (§4.2, §4.5), image
preprocessing (§2.2, §5.5, §7.5), chat template, save/load round trip and decoding."""

from __future__ import annotations

import base64
import functools
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, GPTNeoXTokenizer

from common import make_base_tokenizer, tiny_config
from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaConfig
from omnimamba_hf.processing.tokenization_omnimamba import token_ids_for_base_vocab
from omnimamba_hf.processing import (
    OmniMambaImageProcessor,
    OmniMambaProcessor,
    build_omnimamba_tokenizer,
    check_tokenizer_matches_config,
    register_processing,
)

register_processing()

TASKS = ["<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>", "<|eoc|>", "<|lvg|>"]
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def neox_sized_base():
    """A GPTNeoXTokenizer with exactly 50277 ids (`<|endoftext|>` 0, `<|padding|>` 1, the byte alphabet, fillers):
    the size and class of EleutherAI/gpt-neox-20b, built in milliseconds (no merges, so text is split into bytes)."""
    from tokenizers import pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < 50277:
        vocab[f"filler{i}"] = len(vocab)
        i += 1
    return GPTNeoXTokenizer(vocab=vocab, merges=[])


@functools.lru_cache(maxsize=None)
def tiny_processor():
    return OmniMambaProcessor.from_config(tiny_config(), make_base_tokenizer())


@functools.lru_cache(maxsize=None)
def full_processor():
    """The released layout: 384 px, 729 slots, 68 caption slots, 50288 text ids."""
    return OmniMambaProcessor(OmniMambaImageProcessor(), build_omnimamba_tokenizer(neox_sized_base()))


def ids_of(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def random_image(width=50, height=37, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    return Image.fromarray(array, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(array, "RGBA")


def reference_pixels(image, size):
    """Independent float64 computation of §2.2: PIL convert/resize, /255, both normalisations → (2, 3, S, S)."""
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    x = x.transpose(2, 0, 1)
    dino = (x - np.array(DINO_MEAN)[:, None, None]) / np.array(DINO_STD)[:, None, None]
    return np.stack([dino, (x - 0.5) / 0.5])


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def user(*content):
    return [{"role": "user", "content": list(content)}]


# ---- tokenizer (§1.4) ----------------------------------------------------------------------------------------------


def test_special_ids_for_gpt_neox_sized_base(tmp_path):
    base = neox_sized_base()
    assert len(base) == 50277 and base.pad_token == "<|padding|>"  # transformers 5 default, must be replaced
    tok = build_omnimamba_tokenizer(base)
    assert len(base) == 50277  # the base is not modified
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 50277
    assert tok.convert_tokens_to_ids(TASKS) == list(range(50278, 50287))
    assert tok.image_token == "<image>" and tok.image_token_id == 50287
    assert len(tok) == 50288 == token_ids_for_base_vocab(50277)["text_vocab_size"]
    assert tok.eos_token_id == 0 and tok.padding_side == "left"
    assert tok("a b").input_ids == tok("a b", add_special_tokens=False).input_ids  # no BOS/EOS
    check_tokenizer_matches_config(tok, OmniMambaConfig())  # the released config's ids

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is GPTNeoXTokenizer
    assert (loaded.pad_token, loaded.pad_token_id, loaded.image_token, loaded.image_token_id) == ("[PAD]", 50277, "<image>", 50287)
    assert loaded.convert_tokens_to_ids(TASKS) == list(range(50278, 50287))
    assert len(loaded) == 50288 and loaded.padding_side == "left"


def test_tokenizer_mismatch_errors():
    with pytest.raises(ValueError, match=r"'<\|soi\|>' has id 50278 but the checkpoint expects 50279.*gpt-neox-20b"):
        build_omnimamba_tokenizer(neox_sized_base(), expected_ids=token_ids_for_base_vocab(50278))
    tiny = build_omnimamba_tokenizer(make_base_tokenizer(), expected_ids=tiny_config())
    check_tokenizer_matches_config(tiny, tiny_config())
    with pytest.raises(ValueError, match=r"'\[PAD\]' has id 300 but the config expects 301"):
        check_tokenizer_matches_config(tiny, tiny_config(base_vocab_size=301))
    with pytest.raises(ValueError, match="already contains"):
        build_omnimamba_tokenizer(tiny)
    with pytest.raises(ValueError, match="image_token"):
        OmniMambaProcessor(OmniMambaImageProcessor(), make_base_tokenizer())


# ---- MMU layout (§4.2) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_mmu_layout_matches_hand_built_ids(which):
    proc = tiny_processor() if which == "tiny" else full_processor()
    t = proc.token_ids
    n, size = proc.num_image_tokens, proc.image_processor.size.height
    if which == "full":
        assert (n, size, t["mmu_token_id"], t["soi_token_id"], t["image_token_id"]) == (729, 384, 50283, 50278, 50287)
    question = "What digit is this?"
    prompt = proc.apply_chat_template(user({"type": "image"}, {"type": "text", "text": question}), add_generation_prompt=True)
    assert prompt == f"<|mmu|><image><|sot|>USER: {question} ASSISTANT:"

    image = random_image()
    out = proc.apply_chat_template(
        user({"type": "image", "image": image}, {"type": "text", "text": question}),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    expected = (
        [t["mmu_token_id"], t["soi_token_id"]] + [t["image_token_id"]] * n + [t["eoi_token_id"], t["sot_token_id"]]
        + ids_of(proc, f"USER: {question} ASSISTANT:")
    )
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["pixel_values"].shape == (1, 2, 3, size, size) and out["pixel_values"].dtype == torch.float32
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), reference_pixels(image, size), atol=1e-6)

    # the same ids from a raw prompt, and from the rendered template
    for text in (prompt, f"<image>\nUSER: {question} ASSISTANT:", f"USER: {question} ASSISTANT:<image>"):
        assert proc(images=image, text=text)["input_ids"].tolist() == [expected]

    # text-only chat: the same layout, image_flags False, no pixel_values
    text_only = proc.apply_chat_template(
        user({"type": "text", "text": question}), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert set(text_only) == {"input_ids", "attention_mask", "image_flags"}
    assert text_only["input_ids"].tolist() == [expected]
    assert text_only["image_flags"].dtype == torch.bool and text_only["image_flags"].tolist() == [False]


def test_mmu_batch_left_padding_and_mixed_images():
    proc = tiny_processor()
    pad, image = proc.token_ids["pad_token_id"], random_image()
    long_q, short_q = "Please describe it in detail.", "hi"
    texts = [
        proc.apply_chat_template(user({"type": "text", "text": long_q}), add_generation_prompt=True),
        proc.apply_chat_template(user({"type": "image"}, {"type": "text", "text": short_q}), add_generation_prompt=True),
    ]
    out = proc(images=[image], text=texts)
    single_long = proc(text=texts[0])["input_ids"][0].tolist()
    single_short = proc(images=image, text=texts[1])["input_ids"][0].tolist()
    n_pad = len(single_long) - len(single_short)
    assert n_pad > 0
    assert out["input_ids"].tolist() == [single_long, [pad] * n_pad + single_short]
    assert out["attention_mask"].tolist() == [[1] * len(single_long), [0] * n_pad + [1] * len(single_short)]
    assert out["image_flags"].tolist() == [False, True]
    assert out["pixel_values"].shape[0] == 1

    # a batch of conversations through apply_chat_template (nested image lists)
    chats = [user({"type": "image", "image": image}, {"type": "text", "text": short_q}), user({"type": "text", "text": long_q})]
    batch = proc.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert batch["image_flags"].tolist() == [True, False] and batch["input_ids"].shape[0] == 2


def test_chat_template_multi_turn_and_train_format():
    proc = tiny_processor()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": "And next to it?"},
    ]
    # conv_phi_v0 (SeparatorStyle.TWO, sep " ", sep2 "<|endoftext|>"), stripped
    assert proc.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|mmu|><image><|sot|>USER: What is shown? ASSISTANT: a cat<|endoftext|>USER: And next to it? ASSISTANT:"
    )
    system = [{"role": "system", "content": "Be brief."}, *conversation[:1]]
    assert proc.apply_chat_template(system, add_generation_prompt=True) == (
        "<|mmu|><image><|sot|>Be brief. USER: What is shown? ASSISTANT:"
    )
    # MambaPromptBuilder: "In: {q}\nOut: ", answers end with <|endoftext|>, a finished sample with <|eot|>
    assert proc.apply_chat_template(conversation, add_generation_prompt=True, prompt_format="train") == (
        "<|mmu|><image><|sot|>In: What is shown?\nOut: a cat<|endoftext|>\nIn: And next to it?\nOut: "
    )
    assert proc.apply_chat_template(conversation[:2], prompt_format="train") == (
        "<|mmu|><image><|sot|>In: What is shown?\nOut: a cat<|endoftext|><|eot|>"
    )
    ids = proc.apply_chat_template(conversation[:2], prompt_format="train", tokenize=True, return_dict=True,
                                   processor_kwargs={"images": [random_image()]})["input_ids"][0].tolist()
    assert ids[-2:] == [0, proc.token_ids["eot_token_id"]]  # <|endoftext|>, <|eot|>
    with pytest.raises(Exception, match="prompt_format"):
        proc.apply_chat_template(conversation, prompt_format="chatml")


def test_mmu_malformed_inputs():
    proc = tiny_processor()
    image = random_image()
    q = {"type": "text", "text": "What is this?"}
    with pytest.raises(ValueError, match="no image was passed"):  # an image chat without the image
        proc.apply_chat_template(user({"type": "image"}, q), add_generation_prompt=True, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="at most one image"):
        proc.apply_chat_template(user({"type": "image", "image": image}, {"type": "image", "image": image}, q),
                                 add_generation_prompt=True, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="at most one image"):
        proc(images=[image, image], text="<image><image>What is this?")
    with pytest.raises(ValueError, match="placeholder"):
        proc(images=image, text="<|mmu|><|sot|>USER: What is this? ASSISTANT:")
    with pytest.raises(ValueError, match="generation_mode"):
        proc(text="x", generation_mode="video")


# ---- T2I layout (§4.5) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_t2i_layout_matches_hand_built_ids(which):
    proc = tiny_processor() if which == "tiny" else full_processor()
    t, slots = proc.token_ids, proc.t2i_caption_length
    if which == "full":
        assert slots == 68 and (t["t2i_token_id"], t["sot_token_id"], t["eot_token_id"], t["pad_token_id"]) == (50282, 50280, 50281, 50277)
    short = "a cat"
    long = "The quick brown fox jumps over the lazy dog. " * 4
    short_ids, long_ids = ids_of(proc, short), ids_of(proc, long)
    assert 0 < len(short_ids) < slots < len(long_ids)
    with pytest.warns(UserWarning, match="only the first"):
        out = proc(text=[short, long], generation_mode="image")

    def row(caption_ids):
        kept = caption_ids[:slots]  # the FIRST tokens, right-aligned after left padding
        return [t["t2i_token_id"], t["sot_token_id"], *[t["pad_token_id"]] * (slots - len(kept)), *kept,
                t["eot_token_id"], t["soi_token_id"]]

    assert out["input_ids"].tolist() == [row(short_ids), row(long_ids)]
    assert out["input_ids"].shape == (2, slots + 4)
    assert out["attention_mask"].tolist() == [[1] * (slots + 4)] * 2  # pads are real, unmasked inputs
    assert set(out) == {"input_ids", "attention_mask"}


def test_t2i_malformed_inputs():
    proc = tiny_processor()
    with pytest.raises(ValueError, match="empty"):
        proc(text=[""], generation_mode="image")
    with pytest.raises(ValueError, match="captions only"):
        proc(images=random_image(), text="a cat", generation_mode="image")


# ---- image processor (§2.2, §5.5, §7.5) ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 384])
def test_image_processor_matches_independent_computation(size):
    processor = OmniMambaImageProcessor(size={"height": size, "width": size})
    images = [random_image(50, 37, seed=1), random_image(400, 300, seed=2)]
    pixel_values = processor(images)["pixel_values"]
    assert isinstance(pixel_values, torch.Tensor) and pixel_values.shape == (2, 2, 3, size, size)
    for got, image in zip(pixel_values, images):
        np.testing.assert_allclose(got.numpy(), reference_pixels(image, size), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1"])
def test_image_modes_convert_like_pil(mode):
    processor = OmniMambaImageProcessor(size={"height": 28, "width": 28})
    image = random_image(mode=mode)
    expected = reference_pixels(image, 28)  # PIL .convert("RGB"): alpha is dropped, not composited
    np.testing.assert_allclose(processor(image)["pixel_values"][0].numpy(), expected, atol=1e-6)
    if mode == "RGBA":
        np.testing.assert_allclose(expected, reference_pixels(Image.fromarray(np.asarray(image)[..., :3]), 28), atol=1e-12)


def test_image_input_kinds(tmp_path):
    processor = OmniMambaImageProcessor(size={"height": 28, "width": 28})
    image = random_image(seed=3)
    expected = processor(image)["pixel_values"]
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(image))
    encoded = base64.b64encode(png_bytes(image)).decode()
    array = np.array(image)
    inputs = {
        "path": str(path),
        "pathlib": path,
        "base64": encoded,
        "data_uri": "data:image/png;base64," + encoded,
        "bytes": png_bytes(image),
        "numpy_hwc_uint8": array,
        "numpy_hwc_float": array.astype(np.float32) / 255.0,
        "numpy_chw": array.transpose(2, 0, 1),
        "torch_chw_uint8": torch.from_numpy(array).permute(2, 0, 1),
        "torch_chw_float": torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,
    }
    for name, value in inputs.items():
        torch.testing.assert_close(processor(value)["pixel_values"], expected, atol=1e-6, rtol=0, msg=name)
    grey = np.asarray(image.convert("L"))
    torch.testing.assert_close(processor(grey)["pixel_values"], processor(image.convert("L"))["pixel_values"])

    # 16-bit and float images carry the same picture at another depth: read at their range, not clipped to white
    expected_grey = processor(image.convert("L"))["pixel_values"]
    grey16 = grey.astype(np.uint16) * 257
    wide = {
        "numpy_uint16": grey16,
        "pil_I;16": Image.fromarray(grey16),  # how Pillow opens a 16-bit greyscale PNG
        "png_16bit_file": Image.open(io.BytesIO(png_bytes(Image.fromarray(grey16)))),
        "pil_I": Image.fromarray(grey16.astype(np.int32), mode="I"),
        "pil_F_unit": Image.fromarray(grey.astype(np.float32) / 255.0, mode="F"),
    }
    for name, value in wide.items():
        assert np.asarray(value).dtype != np.uint8, name
        torch.testing.assert_close(processor(value)["pixel_values"], expected_grey, atol=1e-6, rtol=0, msg=name)
    assert float(processor(wide["pil_I;16"])["pixel_values"].mean()) < 0.9  # the old `.convert("RGB")` gave ≈ white
    for bad, match in ((grey.astype(np.float32) * 2.0 - 300.0, "Float image values"), (grey16.astype(np.int64) * 4, "Integer")):
        with pytest.raises(ValueError, match=match):
            processor(bad)

    # through the processor and the chat template: path and base64 content items
    proc = tiny_processor()
    for item in ({"type": "image", "path": str(path)}, {"type": "image", "url": str(path)}, {"type": "image", "base64": encoded}):
        out = proc.apply_chat_template(user(item, {"type": "text", "text": "What?"}), add_generation_prompt=True,
                                       tokenize=True, return_dict=True)
        torch.testing.assert_close(out["pixel_values"], proc.image_processor(image)["pixel_values"])


def test_image_malformed_inputs(tmp_path):
    processor = OmniMambaImageProcessor(size={"height": 28, "width": 28})
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(random_image(200, 200))[:200])
    cases = {
        str(text_file): "not an image file",
        str(empty): "empty",
        str(truncated): "not an image file, or corrupt",
        "no/such/file.png": "not an existing file",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=message):
            processor(source)
    with pytest.raises(ValueError, match="zero size"):
        processor(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero size"):
        processor(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="exceeds the limit"):
        processor(random_image(50, 37), max_image_pixels=1000)
    with pytest.raises(ValueError, match="no image file|not an image file"):
        tiny_processor()(images=str(text_file), text="<image>What?")


def test_postprocess_and_multimodal_output():
    processor = OmniMambaImageProcessor()
    pixels = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 7).expand(2, 3, 1, 7).contiguous()
    expected = [0, 0, 64, 128, 191, 255, 255]  # clamp, (x + 1) / 2 * 255, round
    images = processor.postprocess(pixels)
    assert len(images) == 2 and images[0].size == (7, 1) and images[0].mode == "RGB"
    assert np.asarray(images[1])[0, :, 0].tolist() == expected
    assert processor.postprocess(pixels, return_tensors="np").shape == (2, 1, 7, 3)
    assert processor.postprocess(pixels[0], return_tensors="pt").dtype == torch.uint8
    out = tiny_processor().post_process_multimodal_output(pixels, generation_mode="image")
    assert [np.asarray(i).tolist() for i in out] == [np.asarray(i).tolist() for i in images]
    with pytest.raises(ValueError, match="VQ"):
        processor.postprocess(torch.zeros(1, 3, 2, 2, dtype=torch.long))


def test_preprocess_for_vq_matches_independent_computation():
    processor = OmniMambaImageProcessor()
    image = random_image(301, 200, seed=4)
    array = np.asarray(image)
    s = 200
    crop = array[:, (301 - s) // 2 : (301 + s) // 2]
    ref = np.asarray(Image.fromarray(crop).resize((256, 256), Image.LANCZOS)).astype(np.float64) / 127.5 - 1.0
    got = processor.preprocess_for_vq(image)
    assert got.shape == (3, 256, 256) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    assert processor.preprocess_for_vq([image, image.rotate(90, expand=True)]).shape == (2, 3, 256, 256)


# ---- save / load, registration ----------------------------------------------------------------------------------


def test_save_pretrained_auto_processor_round_trip(tmp_path):
    proc = tiny_processor()
    proc.save_pretrained(tmp_path)
    with open(tmp_path / "processor_config.json") as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("num_image_tokens", "text_vocab_size", "image_vocab_size", "t2i_caption_length")} == {
        "num_image_tokens": 4, "text_vocab_size": 320, "image_vocab_size": 64, "t2i_caption_length": 6}
    assert (tmp_path / "chat_template.jinja").is_file()

    AutoConfig.register("omnimamba", OmniMambaConfig, exist_ok=True)
    for with_config in (False, True):
        if with_config:  # a model directory: config.json next to the processor files
            tiny_config().save_pretrained(tmp_path)
        loaded = AutoProcessor.from_pretrained(tmp_path)
        assert type(loaded) is OmniMambaProcessor and type(loaded.image_processor) is OmniMambaImageProcessor
        assert loaded.chat_template == proc.chat_template
        assert (loaded.num_image_tokens, loaded.text_vocab_size, loaded.image_vocab_size, loaded.t2i_caption_length) == (4, 320, 64, 6)
        assert loaded.token_ids == proc.token_ids and loaded.tokenizer.pad_token == "[PAD]"
        assert loaded.tokenizer.image_token == "<image>" and loaded.tokenizer.padding_side == "left"
        ip = loaded.image_processor
        assert (ip.size.height, ip.size.width, int(ip.resample)) == (28, 28, int(Image.BICUBIC))
        assert tuple(ip.image_mean) == DINO_MEAN and tuple(ip.siglip_image_std) == (0.5, 0.5, 0.5)

        image = random_image()
        chat = user({"type": "image", "image": image}, {"type": "text", "text": "What digit is this?"})
        a = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        b = loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with pytest.warns(UserWarning):
            t2i = [p(text=["a red bicycle"], generation_mode="image")["input_ids"] for p in (proc, loaded)]
        assert torch.equal(*t2i)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is OmniMambaImageProcessor
    register_processing()  # idempotent


# ---- decoding and the id space -------------------------------------------------------------------------------------


def test_decode_never_garbles_image_ids():
    proc = tiny_processor()
    t, V = proc.token_ids, proc.text_vocab_size
    answer = ids_of(proc, "seven")
    sequence = [t["mmu_token_id"], t["soi_token_id"], V, V + 63, t["eoi_token_id"], t["sot_token_id"], *answer,
                len(proc.tokenizer) + 2, -100, 0]  # image ids, an unused embedding row, a label pad, <|endoftext|>
    assert proc.decode(sequence) == "<|mmu|><|soi|><image><image><|eoi|><|sot|>seven<|endoftext|>"
    assert proc.decode(sequence, skip_special_tokens=True) == "<|mmu|><|soi|><|eoi|><|sot|>seven"
    assert proc.batch_decode(torch.tensor([sequence, sequence])) == [proc.decode(sequence)] * 2
    assert proc.post_process_image_text_to_text(torch.tensor([sequence])) == ["seven"]
    assert proc.post_process_image_text_to_text(sequence) == "seven"
    assert proc.post_process_multimodal_output(torch.tensor([sequence])) == ["seven"]
    assert proc.decode(proc.image_codes_to_ids(list(range(64))), skip_special_tokens=True) == ""


def test_image_code_id_conversion():
    proc = tiny_processor()
    codes = torch.tensor([[0, 5, 63]])
    ids = proc.image_codes_to_ids(codes)
    assert ids.tolist() == [[320, 325, 383]] and torch.equal(proc.ids_to_image_codes(ids), codes)
    assert proc.image_codes_to_ids([1, 2]) == [321, 322]
    with pytest.raises(ValueError, match="Image codes"):
        proc.image_codes_to_ids([64])
    with pytest.raises(ValueError, match="Image token ids"):
        proc.ids_to_image_codes([319])
    assert full_processor().image_codes_to_ids([0, 16383]) == [50288, 50288 + 16383]


def test_saved_processor_loads_with_trust_remote_code_without_the_package(tmp_path):
    """save_pretrained writes the processing code and an auto_map: a process that cannot import omnimamba_hf loads the
    processor with trust_remote_code=True and builds the same inputs."""
    import os
    import subprocess
    import sys

    from common import make_base_tokenizer, tiny_config

    processor = OmniMambaProcessor.from_config(tiny_config(), make_base_tokenizer())
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_omnimamba.py").exists() and (tmp_path / "tokenization_omnimamba.py").exists()
    code = f"""
import builtins
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] == "omnimamba_hf":
        raise ImportError("omnimamba_hf must not be needed")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
from transformers import AutoProcessor
p = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert type(p).__module__.startswith("transformers_modules"), type(p).__module__
print(p(text=["a handwritten seven"], generation_mode="image")["input_ids"].tolist())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = processor(text=["a handwritten seven"], generation_mode="image")["input_ids"].tolist()
    assert out.stdout.strip().splitlines()[-1] == str(expected)
