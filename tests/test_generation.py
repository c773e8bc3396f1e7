"""generate() for both tasks against a step-by-step re-implementation of the original decode loop (ORIGINAL-SPEC §5),
batched == unbatched, streaming, constant-size cache, position-table guards, guidance off == plain."""

import copy

import pytest
import torch
from transformers import DynamicCache, TextStreamer

from common import make_base_tokenizer, mmu_prompt_ids, randomize_routing_, t2i_prompt_ids, tiny_config
from omnimamba_hf import OmniMambaForConditionalGeneration
from omnimamba_hf.processing.tokenization_omnimamba import build_omnimamba_tokenizer


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return randomize_routing_(OmniMambaForConditionalGeneration(config).eval(), seed=1, scale=0.3)


def mmu_prompt(c, prompt):
    return mmu_prompt_ids(c, prompt)


def t2i_prompt(c, caption):
    return t2i_prompt_ids(c, caption)


def pixels(seed):
    return torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


# ---- the original decode loop (spec §5.1, §5.7), written against the model's submodules ---------------------------


def original_decode(model, task, ids, image=None, max_length=None, eos=None):
    """First step from the full embedding sequence (image features inserted after `<|mmu|><|soi|>` by concatenation,
    the original's `mmu_multi_ids2embed`), later steps from one id at position `seqlen_offset`; greedy argmax over
    all head columns; stop when every row produced eos or when seqlen_offset >= max_length - 1."""
    m = model.model
    lm = m.language_model
    c = model.config
    with torch.no_grad():
        if task == "mmu":
            emb = lm.embeddings(ids)
            feats = m.projector(m.vision_model(image))
            text_ids = torch.cat([ids[:, :2], ids[:, 2 + c.num_image_tokens :]], dim=1)
            emb_text = lm.embeddings(text_ids)
            emb = torch.cat([emb_text[:, :2], feats, emb_text[:, 2:]], dim=1)
            emb = emb + m.mmu_position_embeddings[:, : emb.shape[1]]
            head, table, embed_one = model.lm_head, m.mmu_position_embeddings[0], lm.embeddings
        else:
            emb = m.caption_mlp(lm.embeddings(ids)) + m.t2i_position_embeddings[:, : ids.shape[1]]
            head, table = model.image_head, m.t2i_position_embeddings[0]
            embed_one = m.image_embeddings
        cache = DynamicCache(config=c.get_text_config(decoder=True))
        hidden, _ = lm(emb, task, cache)
        seqlen_offset = emb.shape[1]
        generated = []
        token = head(hidden[:, -1]).argmax(-1)
        generated.append(token)
        while True:
            if eos is not None and bool((token == eos).all()):
                break
            if seqlen_offset >= max_length - 1:
                break
            step = embed_one(token)[:, None] + table[seqlen_offset][None, None]
            hidden, _ = lm(step, task, cache)
            seqlen_offset += 1
            token = head(hidden[:, -1]).argmax(-1)
            generated.append(token)
    return torch.stack(generated, dim=1)


def test_greedy_t2i_equals_original_loop(model, config):
    ids = torch.tensor([t2i_prompt(config, (8, 9, 10))])
    ours = model.generate(ids, generation_mode="image")
    # the original: max_length = num_tokens + prompt length, so exactly num_tokens tokens
    ref = original_decode(model, "t2i", ids, max_length=config.num_generated_image_tokens + ids.shape[1])
    assert ours.shape == (1, config.num_generated_image_tokens)
    assert torch.equal(ours - config.text_vocab_size, ref)
    pixels_out = model.decode_image_tokens(ours)
    assert pixels_out.shape == (1, 3, config.vq_config.image_size, config.vq_config.image_size)


def test_greedy_mmu_equals_original_loop(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    image = pixels(3)
    # the original's max_length counts image slots; our default length = as long as the position table allows
    ref = original_decode(model, "mmu", ids, image, max_length=config.mmu_max_position_embeddings + 1, eos=0)
    ours = model.generate(ids, pixel_values=image)
    assert torch.equal(ours[:, ids.shape[1] :], ref)
    # the default stops exactly at the end of the position table (never past it)
    if not bool((ref == 0).any()):
        assert ours.shape[1] == config.mmu_max_position_embeddings + 1


def test_mmu_stops_at_eos(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    first = int(model.generate(ids, pixel_values=pixels(3), max_new_tokens=1)[0, -1])
    out = model.generate(ids, pixel_values=pixels(3), max_new_tokens=5, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1 and int(out[0, -1]) == first


def test_incremental_scores_equal_recomputation(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    out = model.generate(ids, pixel_values=pixels(4), max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    full = model(input_ids=out.sequences, pixel_values=pixels(4)).logits
    for k, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, ids.shape[1] - 1 + k], rtol=1e-4, atol=1e-4)
    t2i = torch.tensor([t2i_prompt(config, (8, 9))])
    res = model.generate(t2i, generation_mode="image", return_dict_in_generate=True, output_logits=True)
    seq = torch.cat([t2i, res.sequences[:, :-1]], dim=1)
    full = model(input_ids=seq, task="t2i").logits
    for k, step_logits in enumerate(res.logits):
        torch.testing.assert_close(step_logits[0], full[0, t2i.shape[1] - 1 + k], rtol=1e-4, atol=1e-4)


def test_batched_left_padded_mmu_equals_unbatched(model, config):
    a, b = mmu_prompt(config, (5, 6)), mmu_prompt(config, (5, 6, 7, 8, 9, 10))
    pad = len(b) - len(a)
    ids = torch.tensor([[config.pad_token_id] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    px = torch.cat([pixels(1), pixels(2)])
    batched = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, eos_token_id=None)
    one = model.generate(torch.tensor([a]), pixel_values=pixels(1), max_new_tokens=8, eos_token_id=None)
    two = model.generate(torch.tensor([b]), pixel_values=pixels(2), max_new_tokens=8, eos_token_id=None)
    assert torch.equal(batched[0, pad:], one[0])
    assert torch.equal(batched[1], two[0])


def test_batched_t2i_equals_unbatched(model, config):
    prompts = [t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11,)), t2i_prompt(config, (12, 13, 14, 15, 16, 17))]
    batched = model.generate(torch.tensor(prompts), generation_mode="image")
    for row, p in enumerate(prompts):
        assert torch.equal(batched[row], model.generate(torch.tensor([p]), generation_mode="image")[0])


def test_guidance_scale_one_equals_plain_and_guidance_changes_output(model, config):
    ids = torch.tensor([t2i_prompt(config, (8, 9, 10))])
    plain = model.generate(ids, generation_mode="image")
    assert torch.equal(model.generate(ids, generation_mode="image", guidance_scale=1.0), plain)
    guided = model.generate(ids, generation_mode="image", guidance_scale=5.0, return_dict_in_generate=True, output_logits=True)
    assert guided.sequences.shape == plain.shape
    assert int(guided.sequences.min()) >= config.text_vocab_size


def test_t2i_sampling_is_seeded_and_in_range(model, config):
    ids = torch.tensor([t2i_prompt(config, (8, 9, 10))] * 2)
    torch.manual_seed(0)
    a = model.generate(ids, generation_mode="image", do_sample=True, top_k=8, top_p=0.9, temperature=0.8)
    torch.manual_seed(0)
    b = model.generate(ids, generation_mode="image", do_sample=True, top_k=8, top_p=0.9, temperature=0.8)
    assert torch.equal(a, b)
    V = config.text_vocab_size
    assert bool(((a >= V) & (a < V + config.image_vocab_size)).all())


def test_streaming_yields_the_same_text(model, config):
    tokenizer = build_omnimamba_tokenizer(make_base_tokenizer())

    class Collect(TextStreamer):
        def __init__(self, tok):
            super().__init__(tok, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    streamer = Collect(tokenizer)
    out = model.generate(ids, pixel_values=pixels(5), max_new_tokens=10, streamer=streamer)
    assert streamer.text == tokenizer.decode(out[0, ids.shape[1] :])


def test_cache_size_is_independent_of_generated_length(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])

    def cache_bytes(n):
        out = model.generate(ids, pixel_values=pixels(6), max_new_tokens=n, eos_token_id=None, return_dict_in_generate=True)
        cache = out.cache
        tensors = [t for layer in cache.layers for t in (*layer.conv_states.values(), *layer.recurrent_states.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    sizes = {n: cache_bytes(n) for n in (2, 10, 40)}
    assert len(set(sizes.values())) == 1, sizes
    text = config.text_config
    per_layer = (text.num_heads * text.head_dim + 2 * text.n_groups * text.state_size) * text.conv_kernel * 4 + (
        text.num_heads * text.head_dim * text.state_size * 4
    )
    assert sizes[2] == per_layer * text.num_hidden_layers


def test_position_table_guards(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    room = config.mmu_max_position_embeddings + 1 - ids.shape[1]
    with pytest.raises(ValueError, match="leaves room for at most"):
        model.generate(ids, pixel_values=pixels(1), max_new_tokens=room + 1)
    with pytest.raises(ValueError, match="leaves room for at most"):
        model.generate(ids, pixel_values=pixels(1), max_length=config.mmu_max_position_embeddings + 5)
    assert model.generate(ids, pixel_values=pixels(1), max_new_tokens=room, eos_token_id=None).shape[1] == ids.shape[1] + room
    long_prompt = torch.tensor([[5] * (config.t2i_max_position_embeddings - 10)])
    with pytest.raises(ValueError, match="does not fit the T2I position table"):
        model.generate(long_prompt, generation_mode="image")
    with pytest.raises(ValueError, match="generation_mode"):
        model.generate(ids, generation_mode="video")
    # a prompt of the other task's layout: said so, not a misleading length error or silent garbage
    with pytest.raises(ValueError, match="This is an MMU prompt"):
        model.generate(ids, generation_mode="image")
    with pytest.raises(ValueError, match="This is a T2I prompt"):
        model.generate(torch.tensor([t2i_prompt(config, (8, 9))]), max_new_tokens=3)


# ---- the static-state decoder (the arithmetic of the CUDA-graph fast path, run eagerly on CPU) ----------------------


def test_static_decoder_equals_eager_for_both_tasks(model, config):
    model.reset_graph_decoders()
    t2i = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11, 12))])
    eager = model.generate(t2i, generation_mode="image", decoder="eager", return_dict_in_generate=True, output_logits=True)
    static = model.generate(t2i, generation_mode="image", decoder="static", return_dict_in_generate=True, output_logits=True)
    assert torch.equal(eager.sequences, static.sequences)
    for a, b in zip(eager.logits, static.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a, b = mmu_prompt(config, (5, 6)), mmu_prompt(config, (5, 6, 7, 8, 9, 10))
    pad = len(b) - len(a)
    ids = torch.tensor([[config.pad_token_id] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    px = torch.cat([pixels(1), pixels(2)])
    kw = dict(attention_mask=mask, pixel_values=px, max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(ids, decoder="eager", **kw)
    static = model.generate(ids, decoder="static", **kw)
    assert torch.equal(eager.sequences, static.sequences)
    for x, y in zip(eager.logits, static.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    keys = {key[:2] for key in model.__dict__["_omnimamba_graph_decoders"]}
    assert keys == {("t2i", 2), ("mmu", 2)}  # the static path really ran


def test_static_decoder_sampling_and_eos_match_generation_mixin(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))] * 3)
    px = torch.cat([pixels(1), pixels(2), pixels(3)])
    kw = dict(pixel_values=px, max_new_tokens=15, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.3)
    torch.manual_seed(123)
    eager = model.generate(ids, decoder="eager", **kw)
    torch.manual_seed(123)
    static = model.generate(ids, decoder="static", **kw)
    assert torch.equal(eager, static)
    # eos: rows that finish early are padded, generation stops when every row has finished
    eos = int(eager[0, ids.shape[1] + 2])
    torch.manual_seed(123)
    eager = model.generate(ids, decoder="eager", eos_token_id=eos, **kw)
    torch.manual_seed(123)
    static = model.generate(ids, decoder="static", eos_token_id=eos, **kw)
    assert torch.equal(eager, static)


def test_static_decoder_streams_the_same_text(model, config):
    tokenizer = build_omnimamba_tokenizer(make_base_tokenizer())
    texts = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            texts.append(text)

    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    out = model.generate(ids, pixel_values=pixels(5), max_new_tokens=10, decoder="static", streamer=Collect(tokenizer, skip_prompt=True))
    assert "".join(texts) == tokenizer.decode(out[0, ids.shape[1] :])


def test_static_decoder_hands_what_it_does_not_implement_to_generation_mixin(model, config):
    # a GenerationConfig asking for features outside the static loop's allow-list must not lose them on the fast path
    from transformers import GenerationConfig

    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    base = dict(pixel_values=pixels(4), max_new_tokens=6, eos_token_id=None)
    greedy = model.generate(ids, decoder="eager", **base)
    banned = int(greedy[0, ids.shape[1]])  # the first greedy token
    for decoder in ("eager", "static"):
        out = model.generate(ids, decoder=decoder, generation_config=GenerationConfig(suppress_tokens=[banned]), **base)
        assert banned not in out[0, ids.shape[1] :].tolist(), decoder
    sampled = {}
    for decoder in ("eager", "static"):
        torch.manual_seed(7)
        gen = GenerationConfig(do_sample=True, num_return_sequences=3, min_p=0.2)
        sampled[decoder] = model.generate(ids, decoder=decoder, generation_config=gen, **base)
    assert sampled["static"].shape == (3, ids.shape[1] + 6)
    assert torch.equal(sampled["static"], sampled["eager"])


def test_static_decoder_infers_the_padding_mask_like_generation_mixin(model, config):
    a, b = mmu_prompt(config, (5, 6)), mmu_prompt(config, (5, 6, 7, 8, 9, 10))
    pad = len(b) - len(a)
    ids = torch.tensor([[config.pad_token_id] * pad + a, b])
    kw = dict(pixel_values=torch.cat([pixels(1), pixels(2)]), max_new_tokens=6, eos_token_id=None)
    eager, static = (model.generate(ids, decoder=d, **kw) for d in ("eager", "static"))
    masked = model.generate(ids, decoder="static", attention_mask=(ids != config.pad_token_id).long(), **kw)
    assert torch.equal(static, masked)
    assert torch.equal(static, eager)
    unmasked = model.generate(ids, decoder="static", attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(unmasked[0], masked[0])  # negative control: the pads count when the mask says so


def test_length_arguments_are_checked_on_every_path(model, config):
    from transformers import GenerationConfig

    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    for decoder in ("eager", "static"):
        with pytest.raises(ValueError, match="leaves no room for new tokens"):
            model.generate(ids, decoder=decoder, pixel_values=pixels(1), max_length=ids.shape[1])
    # with no length set, the table's room goes into a copy of the user's config, not beside it as a kwarg
    kwargs, gen = {}, GenerationConfig(do_sample=False)
    used = model._check_text_length(ids.shape[1], gen, kwargs)
    room = config.mmu_max_position_embeddings + 1 - ids.shape[1]
    assert kwargs == {} and gen.max_new_tokens is None and used.max_new_tokens == room
    assert model._check_text_length(ids.shape[1], None, kwargs) is None and kwargs == {"max_new_tokens": room}


def test_image_generation_refuses_what_it_does_not_implement(model, config):
    from transformers import GenerationConfig

    ids = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11,))])
    n = config.num_generated_image_tokens
    for bad in (dict(num_beams=2), dict(max_new_tokens=10), dict(min_p=0.5, do_sample=True), dict(suppress_tokens=[3])):
        with pytest.raises(ValueError, match="Image generation does not support"):
            model.generate(ids, generation_mode="image", **bad)
        with pytest.raises(ValueError, match="Image generation does not support"):
            model.generate(ids, generation_mode="image", generation_config=GenerationConfig(**bad))
    assert model.generate(ids, generation_mode="image", max_new_tokens=n, num_beams=1).shape == (2, n)
    assert model.generate(ids, generation_mode="image", max_new_tokens=n + 100).shape == (2, n)  # a maximum, met
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, generation_mode="image", num_return_sequences=2)
    torch.manual_seed(3)
    several = model.generate(ids, generation_mode="image", do_sample=True, num_return_sequences=3, top_k=50)
    assert several.shape == (6, n)
    torch.manual_seed(3)
    repeated = model.generate(ids.repeat_interleave(3, 0), generation_mode="image", do_sample=True, top_k=50)
    assert torch.equal(several, repeated)  # prompt order: each prompt's images together


def test_continuing_from_a_returned_cache(model, config):
    ids = torch.tensor([mmu_prompt(config, (5, 6, 7))])
    first = model.generate(ids, pixel_values=pixels(3), max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                           decoder="eager")  # fmt: skip
    turn = torch.tensor([[11, 12, 13]])
    whole = torch.cat([first.sequences, turn], dim=-1)
    # the cache holds every token but the last generated one: feed that one and the new turn
    new = whole[:, first.sequences.shape[1] - 1 :]
    cont = model.generate(new, attention_mask=torch.ones_like(whole), cache=first.cache, max_new_tokens=3,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    fresh = model.generate(whole, pixel_values=pixels(3), max_new_tokens=3, eos_token_id=None, output_logits=True,
                           return_dict_in_generate=True, decoder="eager")  # fmt: skip
    torch.testing.assert_close(cont.logits[0], fresh.logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(cont.sequences[:, new.shape[1] :], fresh.sequences[:, whole.shape[1] :])
    with pytest.raises(ValueError, match="position 0 is fed again"):  # the whole conversation on top of the state
        model.generate(whole, attention_mask=torch.ones_like(whole), cache=first.cache, max_new_tokens=3)


def test_cuda_graph_decoder_needs_cuda(model, config):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(torch.tensor([t2i_prompt(config, (8,))]), generation_mode="image", decoder="cuda_graph")


# ---- the chunked prefill of the CUDA-graph path (its arithmetic, run eagerly on CPU) --------------------------------


@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_chunked_prefill_equals_one_shot_prefill(model, config, task):
    """The graph prefill runs an MMU prompt in chunks (powers of two down to `min_chunk`, then the remainder), each
    continuing the recurrent state, and a T2I prompt (all of one length) as one chunk: logits and final states equal
    the one-shot prefill, with left padding too (MMU)."""
    from omnimamba_hf.modeling.graph_prefill_omnimamba import OmniMambaGraphPrefill, chunk_lengths

    assert chunk_lengths(797) == [512, 256, 29] and chunk_lengths(72) == [64, 8] and chunk_lengths(2100) == [1024] * 2 + [52]
    assert chunk_lengths(13, min_chunk=2) == [8, 4, 1]
    if task == "t2i":
        ids = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11, 12))])
        mask, px, positions = None, None, None
    else:
        a, b = mmu_prompt(config, (5, 6)), mmu_prompt(config, (5, 6, 7, 8, 9, 10))
        pad = len(b) - len(a)
        ids = torch.tensor([[config.pad_token_id] * pad + a, b])
        mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
        px = torch.cat([pixels(1), pixels(2)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = copy.deepcopy(model).double()  # float64: only a logic error can differ, not reassociation
    px = px.double() if px is not None else None
    with torch.no_grad():
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=positions, task=task,
                    cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        embeds, _ = model.model.build_inputs_embeds(ids, px, None, positions, task)
        prefill = OmniMambaGraphPrefill(model, task, 2, use_graph=False)
        prefill.min_chunk = 2
        chunks = prefill.chunk_lengths(ids.shape[1])
        assert chunks == [ids.shape[1]] if task == "t2i" else len(chunks) >= 2  # MMU really chunked (tiny chunks)
        logits = prefill(embeds, mask)
        again = prefill(embeds, mask)  # states are reset between prompts
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, logits)
    for ours, ref in zip(prefill.cache.layers, cache.layers):
        torch.testing.assert_close(ours.conv_states[0], ref.conv_states[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.recurrent_states[0], ref.recurrent_states[0], rtol=1e-10, atol=1e-10)


def test_model_with_graph_caches_deep_copies(model, config):
    """Captured decoders / prefill graphs are not part of the model's state: deepcopy and pickling skip them."""
    model.graph_decoder("t2i", 1, decoder="static")
    copied = copy.deepcopy(model)
    assert "_omnimamba_graph_decoders" not in copied.__dict__
    ids = torch.tensor([t2i_prompt(config, (8, 9))])
    assert torch.equal(copied.generate(ids, generation_mode="image", decoder="static"),
                       model.generate(ids, generation_mode="image", decoder="static"))  # fmt: skip


def test_image_code_table_decoder_equals_per_step_mlp(model, config):
    """A T2I decoder can embed image codes from `image_code_table` (every code's lookup + MLP, computed once per call;
    the default on CUDA in half precision) instead of running the MLP each step: the table equals the MLP on every
    code, the decode equals the per-step MLP's, and `load_state` recomputes the table in place after a weight change
    made through `.data` (which leaves no trace)."""
    from omnimamba_hf.modeling.graph_decode_omnimamba import OmniMambaGraphDecoder

    m = copy.deepcopy(model)
    text = config.get_text_config(decoder=True)
    prompt = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11, 12))])
    V, start = config.text_vocab_size, prompt.shape[1]
    tokens = [torch.tensor([V + 3 + k, V + 40 - k]) for k in range(5)]
    every_code = torch.arange(config.image_vocab_size)

    def decode(code_table):
        cache = DynamicCache(config=text)
        with torch.no_grad():
            m(input_ids=prompt, task="t2i", cache=cache, use_cache=True)
        d = OmniMambaGraphDecoder(m, "t2i", 2, compile=False, use_graph=False, code_table=code_table)
        d.load_state(cache)
        return torch.stack([d.step(ids, start + k).clone() for k, ids in enumerate(tokens)]), d

    plain, d_plain = decode(False)
    tabled, d = decode(True)
    assert d_plain._code_table is None and d._code_table is not None
    with torch.no_grad():
        torch.testing.assert_close(d._code_table, m.model.image_embeddings(every_code), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tabled, plain, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        m.model.image_embeddings.mlp.linear_3.bias.data += 0.5
    changed, d2 = decode(True)
    assert d2._code_table is d._code_table  # the same buffer (a captured graph reads it), refreshed in place
    with torch.no_grad():
        torch.testing.assert_close(d._code_table, m.model.image_embeddings(every_code), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(changed, decode(False)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, tabled, atol=1e-3)
    # the default: off on the CPU and for MMU decoders; the table is not model state
    assert OmniMambaGraphDecoder(m, "t2i", 1, compile=False, use_graph=False)._code_table is None
    assert OmniMambaGraphDecoder(m, "mmu", 1, compile=False, use_graph=False, code_table=True)._code_table is None
    assert "_omnimamba_image_code_table" not in copy.deepcopy(m).__dict__


# ---- the recurrent state in the model's dtype (config.ssm_state_dtype="model", as the original keeps it) ------------


def test_ssm_state_dtype_is_validated():
    from omnimamba_hf import OmniMambaConfig
    from omnimamba_hf.modeling.mixer_omnimamba import ssm_state_dtype

    with pytest.raises(Exception, match="ssm_state_dtype must be one of"):  # hub's strict-dataclass error wraps it
        OmniMambaConfig(ssm_state_dtype="bfloat16")
    config = tiny_config()
    assert ssm_state_dtype(config, torch.bfloat16) == torch.float32  # the default: float32 ...
    assert ssm_state_dtype(config, torch.float64) == torch.float64  # ... or wider
    config.ssm_state_dtype = "model"
    assert ssm_state_dtype(config, torch.bfloat16) == torch.bfloat16
    config.ssm_state_dtype = "half"  # set after construction: caught where it is read
    with pytest.raises(ValueError, match="'float32' or 'model'"):
        ssm_state_dtype(config, torch.bfloat16)


def test_state_in_model_dtype_is_the_float32_update_rounded_once(model, config):
    """With `ssm_state_dtype="model"` in bfloat16, every path keeps the SSM state in bf16 (half the bytes) and computes
    each update in float32, rounding it once when stored (the original's `selective_state_update` with a bf16 state,
    ORIGINAL-SPEC §5.3): eager forward steps and the static decoder each equal the float32-state computation with the
    state rounded to bf16 after every update, bit for bit; both differ from the float32-state decode (the option is
    not a no-op); a cached decoder is not reused across the setting."""
    from omnimamba_hf.modeling.graph_decode_omnimamba import OmniMambaGraphDecoder

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    assert all(layer.mixer.state_config is m16.config for layer in m16.model.language_model.layers)
    text = config.get_text_config(decoder=True)
    prompt = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11, 12))])
    V = config.text_vocab_size
    tokens = [torch.tensor([V + 3 + k, V + 40 - k]) for k in range(5)]
    start = prompt.shape[1]

    def eager(setting, round_after_update=False):
        m16.config.ssm_state_dtype = setting
        cache, logits = DynamicCache(config=text), []
        with torch.no_grad():
            m16(input_ids=prompt, task="t2i", cache=cache, use_cache=True)
            for k, ids in enumerate(tokens):
                if round_after_update:
                    for layer in cache.layers:
                        layer.recurrent_states[0].copy_(layer.recurrent_states[0].bfloat16())
                out = m16(input_ids=ids[:, None], task="t2i", cache=cache, use_cache=True,
                          position_ids=torch.full((2, 1), start + k))  # fmt: skip
                logits.append(out.logits[:, -1])
        return torch.stack(logits), cache

    model_state, cache16 = eager("model")
    rounded, _ = eager("float32", round_after_update=True)
    plain, cache32 = eager("float32")
    assert {layer.recurrent_states[0].dtype for layer in cache16.layers} == {torch.bfloat16}
    assert {layer.recurrent_states[0].dtype for layer in cache32.layers} == {torch.float32}
    assert torch.equal(model_state, rounded)
    assert not torch.equal(model_state, plain)
    torch.testing.assert_close(model_state.float(), plain.float(), rtol=0.05, atol=0.05)  # close, at bf16 accuracy

    # the static decoder (the CUDA-graph step's arithmetic) from the same bf16 prefill state
    def static(setting, round_after_update=False):
        m16.config.ssm_state_dtype = setting
        d = OmniMambaGraphDecoder(m16, "t2i", 2, compile=False, use_graph=False, backend="inductor")
        d.load_state(cache16)
        out = []
        for k, ids in enumerate(tokens):
            out.append(d.step(ids, start + k).clone())
            if round_after_update:
                d.ssm.copy_(d.ssm.bfloat16())
        return torch.stack(out), d

    ours, d16 = static("model")
    ref, d32 = static("float32", round_after_update=True)
    assert d16.ssm.dtype == torch.bfloat16 and d16.ssm.nbytes * 2 == d32.ssm.nbytes
    assert torch.equal(ours, ref) and torch.equal(d16.ssm.float(), d32.ssm)
    assert not torch.equal(ours, static("float32")[0])

    # generate(): the decoder cache is keyed by the setting; eager and static agree
    m16.config.ssm_state_dtype = "model"
    kw = dict(generation_mode="image", return_dict_in_generate=True, output_logits=True)
    a = m16.generate(prompt, decoder="eager", **kw)
    b = m16.generate(prompt, decoder="static", **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0.02, atol=0.02)
    m16.config.ssm_state_dtype = "float32"
    m16.generate(prompt, decoder="static", **kw)
    states = {key[3]: d.ssm.dtype for key, d in m16.__dict__["_omnimamba_graph_decoders"].items()}
    assert states == {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32}


def test_choices_inside_the_graph_equal_the_step_by_step_loop(model, config, monkeypatch):
    """Greedy and plain sampled decoding make every choice after the first inside the decoder (`decode()`: the
    choice, eos and padding, the fed-back id and position; one graph replay per 8 steps on CUDA). Same tokens as the
    eager loop (GenerationMixin for MMU), for both tasks, with rows that finish at different steps, lengths that are
    not a multiple of the chunk, a stop once every row has finished, guidance, and seeded sampling."""
    from omnimamba_hf.modeling import graph_decode_omnimamba as gd

    calls = []
    decode = gd.OmniMambaGraphDecoder.decode
    monkeypatch.setattr(gd.OmniMambaGraphDecoder, "decode", lambda self, *a, **k: calls.append(a[2]) or decode(self, *a, **k))
    model.reset_graph_decoders()
    t2i = torch.tensor([t2i_prompt(config, (8, 9, 10)), t2i_prompt(config, (11, 12))])
    sampled = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.8)
    for kw in (dict(), dict(guidance_scale=3.0), sampled, dict(sampled, guidance_scale=2.0)):
        torch.manual_seed(7)
        static = model.generate(t2i, generation_mode="image", decoder="static", **kw)
        torch.manual_seed(7)
        assert torch.equal(static, model.generate(t2i, generation_mode="image", decoder="eager", **kw)), kw
    assert calls == [config.num_generated_image_tokens - 1] * 4  # 15 steps: one chunk of 8, then 7 single steps

    ids = torch.tensor([mmu_prompt(config, (5, 6, 7)), mmu_prompt(config, (5, 8, 9)), mmu_prompt(config, (9, 10, 11))])
    px = torch.cat([pixels(1), pixels(2), pixels(3)])
    free = model.generate(ids, pixel_values=px, max_new_tokens=21, eos_token_id=None, decoder="eager")[:, ids.shape[1] :]
    # an eos id that rows choose first at different steps (or never), one of them after the first chunk
    first = lambda t: [int((r == t).nonzero()[0]) if bool((r == t).any()) else None for r in free]  # noqa: E731
    eos = next(int(t) for t in free.flatten().unique() if len(set(first(t))) > 1 and max(s or 0 for s in first(t)) > 8)
    for max_new, more in ((21, {}), (5, {}), (21, sampled)):
        kw = dict(pixel_values=px, max_new_tokens=max_new, eos_token_id=eos, **more)
        calls.clear()
        torch.manual_seed(3)
        static = model.generate(ids, decoder="static", **kw)
        torch.manual_seed(3)
        assert torch.equal(static, model.generate(ids, decoder="eager", **kw)), (eos, first(eos), more)
        assert calls == [max_new - 1]
    # every row done early: generation stops at the step the last row chose eos, as the loop does (also when that
    # is the first token, chosen from the prefill's logits)
    for row_eos in (int(free[0, 1]), int(free[0, 0])):
        kw = dict(pixel_values=px[:1], max_new_tokens=21, eos_token_id=row_eos)
        static = model.generate(ids[:1], decoder="static", **kw)
        assert torch.equal(static, model.generate(ids[:1], decoder="eager", **kw))
    assert static.shape[1] == ids.shape[1] + 1
    # what needs the host loop takes it: logits returned, a repetition penalty
    calls.clear()
    model.generate(ids, decoder="static", pixel_values=px, max_new_tokens=4, repetition_penalty=1.2)
    model.generate(t2i, generation_mode="image", decoder="static", return_dict_in_generate=True, output_logits=True)
    assert calls == []

    # the decoder's decode() against its own step() + argmax, fed back by hand
    dec = model.graph_decoder("t2i", 2, "static")
    state = (dec.conv.clone(), dec.ssm.clone())
    start = torch.tensor([3, 5])
    ours = dec.decode(start, 12, 9, offset=config.text_vocab_size)
    with pytest.raises(ValueError, match="position table"):
        dec.decode(start, 20, 9, offset=config.text_vocab_size)
    dec.conv.copy_(state[0])
    dec.ssm.copy_(state[1])
    ref, fed = [], start
    for k in range(9):
        ref.append(dec.step(fed + config.text_vocab_size, 12 + k).argmax(-1))
        fed = ref[-1]
    assert torch.equal(ours, torch.stack(ref, 1))
