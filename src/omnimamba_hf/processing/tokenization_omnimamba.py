"""OmniMamba's text tokenizer: a GPT-NeoX-20B byte-level BPE plus the original's added tokens (ORIGINAL-SPEC §1.4).

There is no tokenizer class of our own: `build_omnimamba_tokenizer` extends any GPT-NeoX-style fast tokenizer in place
of the original's `UniversalPrompting.__init__`, so the result saves and loads with plain `AutoTokenizer`:

* `[PAD]` is added with `add_special_tokens({"pad_token": ...})` and becomes the pad token, id `B` (transformers 5's
  `GPTNeoXTokenizer` defaults the pad to `<|padding|>` = 1: that is overridden, §9.5);
* the nine task tokens `<|soi|> … <|lvg|>` follow as normal (non-special) added tokens, ids `B+1 … B+9`;
* the MMU image placeholder `<image>` is a named special token (`tokenizer.image_token`), id `B+10`, the last row of
  the padded text embedding that the original never produces.

For the 50277-id GPT-NeoX-20B tokenizer this gives `[PAD]` 50277, `<|soi|>` 50278 … `<|lvg|>` 50286, `<image>` 50287,
`len(tokenizer)` 50288 = the text vocabulary. No BOS/EOS is inserted, padding is on the left.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from tokenizers import AddedToken

TASK_TOKENS = ("<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>", "<|eoc|>", "<|lvg|>")
PAD_TOKEN = "[PAD]"
IMAGE_TOKEN = "<image>"


def token_ids_for_base_vocab(base_vocab_size: int, pad_vocab_size_multiple: int = 16) -> dict:
    """The special-token ids and padded text vocabulary that follow from a base GPT-NeoX-style tokenizer of
    `base_vocab_size` ids (ORIGINAL-SPEC §1.4): `[PAD]` first, then the nine task tokens in order, then the image
    placeholder; the embedding is padded to a multiple of 16. For the 50277-id GPT-NeoX-20B tokenizer this gives
    `[PAD]` 50277, `<|soi|>` 50278 … `<|lvg|>` 50286, `<image>` 50287 and 50288 embedding rows."""
    b = base_vocab_size
    names = ("soi", "eoi", "sot", "eot", "t2i", "mmu", "soc", "eoc", "lvg")
    ids = {"pad_token_id": b, **{f"{n}_token_id": b + 1 + i for i, n in enumerate(names)}}
    ids["image_token_id"] = b + 10
    m = pad_vocab_size_multiple
    ids["text_vocab_size"] = -(-(b + 11) // m) * m
    return ids


# id name (as in `token_ids_for_base_vocab` / `OmniMambaConfig`) -> token string
TOKEN_NAMES: dict[str, str] = {
    "pad_token_id": PAD_TOKEN,
    **{f"{tok[2:-2]}_token_id": tok for tok in TASK_TOKENS},  # "<|soi|>" -> "soi_token_id"
    "image_token_id": IMAGE_TOKEN,
}

_FIX_HINT = (
    "OmniMamba checkpoints are built on the exact 50277-id `EleutherAI/gpt-neox-20b` tokenizer: load that one "
    "(`AutoTokenizer.from_pretrained('EleutherAI/gpt-neox-20b')`) and pass it to `build_omnimamba_tokenizer`, or use "
    "the tokenizer saved next to the checkpoint."
)


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """Ids of `[PAD]`, the nine task tokens and `<image>` in `tokenizer` (None for a token it does not know)."""
    vocab = tokenizer.get_vocab()
    return {name: vocab.get(token) for name, token in TOKEN_NAMES.items()}


def _expected_dict(expected) -> dict:
    """A dict of expected ids from a dict or from a config object (`OmniMambaConfig`-like attributes)."""
    if isinstance(expected, Mapping):
        return dict(expected)
    names = [*TOKEN_NAMES, "eos_token_id", "text_vocab_size"]
    return {n: getattr(expected, n) for n in names if getattr(expected, n, None) is not None}


def _check_ids(tokenizer, expected: Mapping, source: str) -> None:
    actual = special_token_ids(tokenizer)
    problems = []
    for name, want in expected.items():
        if name in actual and actual[name] != want:
            problems.append(f"{TOKEN_NAMES[name]!r} has id {actual[name]} but {source} expects {want}")
        elif name == "eos_token_id" and isinstance(want, int) and tokenizer.eos_token_id != want:
            problems.append(f"eos {tokenizer.eos_token!r} has id {tokenizer.eos_token_id} but {source} expects {want}")
        elif name == "text_vocab_size" and len(tokenizer) > want:
            problems.append(f"the tokenizer has {len(tokenizer)} ids but {source} has only {want} text embedding rows")
    if problems:
        raise ValueError("OmniMamba tokenizer mismatch: " + "; ".join(problems) + ". " + _FIX_HINT)


def build_omnimamba_tokenizer(base_tokenizer, expected_ids: Mapping | object | None = None):
    """Return a copy of `base_tokenizer` (a GPT-NeoX-style fast tokenizer of `B` ids) extended with OmniMamba's tokens.

    Args:
        base_tokenizer: e.g. `AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b")`. It must not contain the
            OmniMamba tokens yet (an already-built tokenizer is used as is; check it with
            `check_tokenizer_matches_config`).
        expected_ids: optional ids the result must also have, e.g. a checkpoint config (`OmniMambaConfig`) or a dict
            with keys of `token_ids_for_base_vocab` (`pad_token_id`, `soi_token_id`, …, `image_token_id`,
            `text_vocab_size`, optionally `eos_token_id`).

    Raises:
        ValueError: if the resulting ids differ from `token_ids_for_base_vocab(B)` or from `expected_ids`; the message
        names each token, its id and the expected id.
    """
    present = [tok for tok in TOKEN_NAMES.values() if tok in base_tokenizer.get_vocab()]
    if present:
        raise ValueError(
            f"The base tokenizer already contains {present}: pass the plain GPT-NeoX tokenizer (the OmniMamba tokens "
            "are appended after its last id), or use an already-built OmniMamba tokenizer directly."
        )
    tokenizer = copy.deepcopy(base_tokenizer)
    base_size = len(tokenizer)
    # §1.4: [PAD] first (becomes the pad token even if one was set, e.g. GPT-NeoX's <|padding|>) ...
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    # ... then the nine task tokens as normal added tokens, in the original order ...
    tokenizer.add_tokens(list(TASK_TOKENS))
    # ... then the MMU placeholder as a *named* special token, so `tokenizer.image_token` survives save/load.
    tokenizer._set_model_specific_special_tokens({"image_token": IMAGE_TOKEN})
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved in tokenizer_config.json

    # The original never inserts BOS/EOS (GPT-NeoX adds none); switch it off if the base was configured to.
    if tokenizer("a").input_ids != tokenizer("a", add_special_tokens=False).input_ids:
        tokenizer.add_bos_token = False
        tokenizer.add_eos_token = False
        if tokenizer("a").input_ids != tokenizer("a", add_special_tokens=False).input_ids:
            raise ValueError("The base tokenizer inserts BOS/EOS tokens and they could not be switched off.")

    wanted = token_ids_for_base_vocab(base_size)
    _check_ids(tokenizer, wanted, f"a base vocabulary of {base_size} ids (ORIGINAL-SPEC §1.4)")
    if expected_ids is not None:
        _check_ids(tokenizer, _expected_dict(expected_ids), "the checkpoint")
    return tokenizer


def check_tokenizer_matches_config(tokenizer, config) -> None:
    """Raise a ValueError unless `tokenizer`'s special-token ids (`[PAD]`, task tokens, `<image>`, eos) and size fit
    `config` (an `OmniMambaConfig`, or a dict of expected ids)."""
    _check_ids(tokenizer, _expected_dict(config), "the config")


__all__ = [
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "TASK_TOKENS",
    "TOKEN_NAMES",
    "build_omnimamba_tokenizer",
    "check_tokenizer_matches_config",
    "special_token_ids",
    "token_ids_for_base_vocab",
]
