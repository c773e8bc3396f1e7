"""The demo's data: scikit-learn's handwritten digits (1797 greyscale 8×8 images, labels 0-9, shipped inside the
scikit-learn wheel, so nothing is downloaded), rendered as small RGB images, with the texts the two tasks train on.

* Images: the 8×8 grid (values 0-16, 16 = full ink) is drawn as white ink on black, upscaled with PIL's bicubic
  filter to the size asked for (the tiny vision towers' input size for MMU, the tiny VQ's image size for T2I) and
  converted to RGB. `digit_features` goes the other way (any image → greyscale → 8×8 box average → 0-16), which is
  what the independent scikit-learn classifier of `evaluate.py` reads.
* Split: a stratified 80 / 20 train / held-out split with a fixed seed; nothing of the held-out part is seen in
  training (neither by the VQ, nor the vision towers, nor the model).
* Texts: MMU questions ("What digit is this?" → "seven"), T2I captions ("a handwritten seven"), and the stage-1
  alignment caption of every image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import PIL.Image

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# MMU: the question the demo is evaluated with, and paraphrases the model also sees in training.
QUESTION = "What digit is this?"
TRAIN_QUESTIONS = (QUESTION, "Which number is written here?", "What number is shown in the image?")
# T2I: the caption the demo is evaluated with (`caption_for`), plus paraphrases seen in training.
CAPTION_TEMPLATES = ("a handwritten {}", "the digit {}", "a picture of the number {}")
# Stage-1 MMU alignment: one caption per image (the original aligns on image captions, spec §4.3).
ALIGN_TEMPLATE = "a handwritten {} in white ink on a black background"

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def answer_for(label: int) -> str:
    return NUMBER_WORDS[int(label)]


def caption_for(label: int) -> str:
    """The T2I caption the demo generates from: "a handwritten seven"."""
    return CAPTION_TEMPLATES[0].format(NUMBER_WORDS[int(label)])


def captions_for(label: int) -> list[str]:
    return [t.format(NUMBER_WORDS[int(label)]) for t in CAPTION_TEMPLATES]


def label_from_text(text: str) -> int | None:
    """The digit a generated answer names (the first number word in it), or None."""
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    for word in words:
        if word in NUMBER_WORDS:
            return NUMBER_WORDS.index(word)
    return None


def demo_texts() -> list[str]:
    """Every text the demo trains on or asks, in both prompt formats: the tokenizer is trained on these."""
    texts = []
    for label, word in enumerate(NUMBER_WORDS):
        for q in TRAIN_QUESTIONS:
            texts.append(f"USER: {q} ASSISTANT: {word}")
            texts.append(f"In: {q}\nOut: {word}")
        texts += captions_for(label)
        texts.append(ALIGN_TEMPLATE.format(word))
        texts.append(word)
    return texts


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """`(images (1797, 8, 8) float32 in [0, 16], labels (1797,) int64)` from `sklearn.datasets.load_digits`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - the demo extra
        raise ImportError("The demo needs scikit-learn: pip install 'omnimamba-hf[demo]'.") from err
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digit_to_image(digit: np.ndarray, size: int) -> PIL.Image.Image:
    """An 8×8 digit (values 0-16) → `size`×`size` RGB image, white ink on black, bicubic upscaling."""
    grey = np.clip(np.asarray(digit, dtype=np.float32) / 16.0 * 255.0, 0, 255).round().astype(np.uint8)
    image = PIL.Image.fromarray(grey, mode="L")
    if size != grey.shape[0]:
        image = image.resize((size, size), PIL.Image.BICUBIC)
    return image.convert("RGB")


def digit_features(image) -> np.ndarray:
    """Any image (PIL, or HWC uint8 array) → the 64 features scikit-learn's digits use: greyscale, box-averaged to
    8×8, scaled to 0-16."""
    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image))
    grey = image.convert("L")
    if grey.size != (8, 8):
        grey = grey.resize((8, 8), PIL.Image.BOX)
    return np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0 * 16.0


@dataclass
class DigitsSplit:
    """The fixed train / held-out split: 8×8 arrays, labels and the row indices into `load_digits()`."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_index: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_index: np.ndarray

    def subset(self, max_train: int | None = None, max_test: int | None = None) -> DigitsSplit:
        """The first rows of each part (both parts are in a shuffled order, so a prefix stays roughly balanced)."""
        return DigitsSplit(
            self.train_images[:max_train], self.train_labels[:max_train], self.train_index[:max_train],
            self.test_images[:max_test], self.test_labels[:max_test], self.test_index[:max_test],
        )  # fmt: skip


def load_split(seed: int = SPLIT_SEED, held_out_fraction: float = HELD_OUT_FRACTION) -> DigitsSplit:
    """Stratified split of the 1797 digits (1437 train / 360 held-out at the defaults)."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_arrays()
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=held_out_fraction, random_state=seed, stratify=labels)
    return DigitsSplit(images[train_idx], labels[train_idx], train_idx, images[test_idx], labels[test_idx], test_idx)


def render(images: np.ndarray, size: int) -> list[PIL.Image.Image]:
    return [digit_to_image(d, size) for d in images]


__all__ = [
    "ALIGN_TEMPLATE",
    "CAPTION_TEMPLATES",
    "DigitsSplit",
    "NUMBER_WORDS",
    "QUESTION",
    "TRAIN_QUESTIONS",
    "answer_for",
    "caption_for",
    "captions_for",
    "demo_texts",
    "digit_features",
    "digit_to_image",
    "label_from_text",
    "load_digits_arrays",
    "load_split",
    "render",
]
