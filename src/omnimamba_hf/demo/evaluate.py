"""Evaluating the demo model on the held-out digits.

* **MMU answer accuracy**: every held-out digit is asked "What digit is this?" through the chat template and
  `model.generate` (greedy, the original's decoding); the answer is right when the first number word in it is the
  digit's name.
* **T2I class consistency**: for every digit class, images are generated from "a handwritten {name}" (greedy, and
  `samples_per_class` sampled ones with top-k), VQ-decoded, downscaled to 8×8 grey and classified by an independent
  scikit-learn SVM trained on the real 8×8 training digits (not on anything the model produced); consistency is the
  fraction classified as the prompted class. For reference the report also gives the SVM's accuracy on the real
  held-out digits and on their VQ reconstructions (the ceiling the VQ tokenizer allows).
* Files: `t2i_samples.png` (one row per class), `mmu_examples.png` (held-out digits with the model's answers),
  `report.json` and `report.md`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from . import data as D


def train_reference_classifier(split: D.DigitsSplit):
    """scikit-learn `SVC(gamma=0.001)` on the real 8×8 training digits (the classic scikit-learn digits example)."""
    from sklearn.svm import SVC

    return SVC(gamma=0.001).fit(split.train_images.reshape(len(split.train_images), -1), split.train_labels)


def classify_images(classifier, images) -> np.ndarray:
    return classifier.predict(np.stack([D.digit_features(image) for image in images]))


@torch.no_grad()
def answer_questions(model, processor, images, question: str = D.QUESTION, batch_size: int = 64,
                     max_new_tokens: int = 4) -> list[str]:  # fmt: skip
    """Greedy answers to `question` about each image (chat template, `generate`)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt").to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [a.strip() for a in processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])]
    return answers


@torch.no_grad()
def generate_images(model, processor, captions: list[str], do_sample: bool = False, top_k: int | None = None,
                    temperature: float = 1.0, seed: int = 0, batch_size: int = 100) -> list[PIL.Image.Image]:  # fmt: skip
    """Images from captions: `generate(..., generation_mode="image")` → `decode_image_tokens` → PIL."""
    torch.manual_seed(seed)
    images = []
    for i in range(0, len(captions), batch_size):
        inputs = processor(text=captions[i : i + batch_size], generation_mode="image", return_tensors="pt").to(model.device)
        kwargs = {"do_sample": True, "top_k": top_k, "temperature": temperature} if do_sample else {"do_sample": False}
        ids = model.generate(inputs["input_ids"], generation_mode="image", **kwargs)
        images += processor.postprocess(model.decode_image_tokens(ids))
    return images


def _label(image: PIL.Image.Image, text: str, colour=(255, 255, 255), height: int = 12) -> PIL.Image.Image:
    canvas = PIL.Image.new("RGB", (image.width, image.height + height), (40, 40, 40))
    canvas.paste(image, (0, height))
    PIL.ImageDraw.Draw(canvas).text((2, 0), text, fill=colour)
    return canvas


def save_t2i_grid(rows: list[list[PIL.Image.Image]], names: list[str], path: str, scale: int = 4,
                  verdicts: list[list[bool]] | None = None) -> None:  # fmt: skip
    """One row per class: the class name, then its images (nearest-upscaled `scale`×), with a red frame where the
    reference classifier disagrees with the prompt."""
    cell = rows[0][0].width * scale
    pad, label_w = 2, 48
    width = label_w + len(rows[0]) * (cell + pad)
    grid = PIL.Image.new("RGB", (width, len(rows) * (cell + pad)), (40, 40, 40))
    draw = PIL.ImageDraw.Draw(grid)
    for r, (row, name) in enumerate(zip(rows, names)):
        y = r * (cell + pad)
        draw.text((2, y + cell // 2 - 5), name, fill=(255, 255, 255))
        for c, image in enumerate(row):
            x = label_w + c * (cell + pad)
            grid.paste(image.resize((cell, cell), PIL.Image.NEAREST), (x, y))
            if verdicts is not None and not verdicts[r][c]:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(230, 40, 40), width=2)
    grid.save(path)


def save_mmu_examples(images, answers: list[str], truths: list[int], path: str, scale: int = 2, per_row: int = 8) -> None:
    """Held-out digits with the model's answer above each (green when right, red when wrong)."""
    tiles = []
    for image, answer, truth in zip(images, answers, truths):
        ok = D.label_from_text(answer) == truth
        big = image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
        tiles.append(_label(big, answer[:10] or "(empty)", (80, 220, 80) if ok else (240, 70, 70)))
    w, h = tiles[0].size
    n_rows = -(-len(tiles) // per_row)
    sheet = PIL.Image.new("RGB", (per_row * (w + 2), n_rows * (h + 2)), (20, 20, 20))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % per_row) * (w + 2), (i // per_row) * (h + 2)))
    sheet.save(path)


def evaluate_demo(model, processor, output_dir: str, max_eval_images: int | None = None,
                  samples_per_class: int = 10, top_k: int = 8, seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Run both evaluations on the held-out digits, write the PNGs and the reports to `output_dir`; return the report."""
    from tqdm.auto import tqdm

    os.makedirs(output_dir, exist_ok=True)
    split = D.load_split().subset(None, max_eval_images)
    classifier = train_reference_classifier(split)
    size = model.config.vision_config.image_size
    vq_size = model.config.vq_config.image_size
    report: dict = {"held_out_digits": int(len(split.test_labels))}
    bar = tqdm(total=4, desc="Evaluating", disable=not progress, dynamic_ncols=True)

    # reference numbers for the classifier and the VQ tokenizer
    start = time.time()
    real = D.render(split.test_images, vq_size)
    report["classifier_accuracy_real"] = float((classify_images(classifier, real) == split.test_labels).mean())
    with torch.no_grad():
        pixels = processor.image_processor.preprocess_for_vq(real, vq_size).to(model.device)
        recon = processor.postprocess(model.model.vqmodel.decode_codes(model.model.vqmodel.encode_to_codes(pixels)))
    report["classifier_accuracy_vq_reconstruction"] = float((classify_images(classifier, recon) == split.test_labels).mean())
    bar.update()

    # MMU
    images = D.render(split.test_images, size)
    answers = answer_questions(model, processor, images)
    predicted = [D.label_from_text(a) for a in answers]
    truths = [int(y) for y in split.test_labels]
    report["mmu_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truths)]))
    report["mmu_question"] = D.QUESTION
    report["mmu_examples"] = [{"label": t, "answer": a} for t, a in list(zip(truths, answers))[:16]]
    report["mmu_confusion"] = _confusion(truths, predicted)
    save_mmu_examples(images[:32], answers[:32], truths[:32], os.path.join(output_dir, "mmu_examples.png"))
    images[0].save(os.path.join(output_dir, "example_digit.png"))  # to try `omnimamba-hf describe` on
    report["example_digit"] = {"file": "example_digit.png", "label": truths[0], "answer": answers[0]}
    bar.update()

    # T2I: greedy (the original's decoding) and sampled
    classes = list(range(10))
    greedy = generate_images(model, processor, [D.caption_for(c) for c in classes])
    greedy_pred = classify_images(classifier, greedy)
    report["t2i_consistency_greedy"] = float(np.mean(greedy_pred == np.array(classes)))
    bar.update()
    captions = [D.caption_for(c) for c in classes for _ in range(samples_per_class)]
    sampled = generate_images(model, processor, captions, do_sample=True, top_k=top_k, seed=seed)
    targets = np.repeat(np.array(classes), samples_per_class)
    sampled_pred = classify_images(classifier, sampled)
    report["t2i_consistency"] = float(np.mean(sampled_pred == targets))
    report["t2i_per_class"] = {
        D.NUMBER_WORDS[c]: float(np.mean(sampled_pred[targets == c] == c)) for c in classes
    }
    report["t2i_sampling"] = {"samples_per_class": samples_per_class, "top_k": top_k, "temperature": 1.0, "seed": seed}
    rows = [[greedy[c]] + sampled[c * samples_per_class : (c + 1) * samples_per_class] for c in classes]
    verdicts = [[bool(greedy_pred[c] == c)] + list(sampled_pred[targets == c] == c) for c in classes]
    save_t2i_grid(rows, list(D.NUMBER_WORDS), os.path.join(output_dir, "t2i_samples.png"), verdicts=verdicts)
    bar.update()
    bar.close()
    report["eval_seconds"] = round(time.time() - start, 1)
    write_reports(report, output_dir)
    return report


def _confusion(truths: list[int], predicted: list[int | None]) -> list[list[int]]:
    """10 × 11 counts: rows true digit, columns answered digit (last column: no digit named)."""
    table = [[0] * 11 for _ in range(10)]
    for t, p in zip(truths, predicted):
        table[t][10 if p is None else p] += 1
    return table


def format_summary(report: dict) -> str:
    lines = [
        f"Held-out digits: {report['held_out_digits']}",
        f"MMU answer accuracy ('{report['mmu_question']}'): {report['mmu_accuracy']:.1%}",
        f"T2I class consistency (SVM on generated digits, {report['t2i_sampling']['samples_per_class']} sampled per "
        f"class, top-k {report['t2i_sampling']['top_k']}): {report['t2i_consistency']:.1%}"
        f"  (greedy, 1 per class: {report['t2i_consistency_greedy']:.0%})",
        f"Reference: the SVM on real held-out digits {report['classifier_accuracy_real']:.1%}, on their VQ "
        f"reconstructions {report['classifier_accuracy_vq_reconstruction']:.1%}",
    ]
    return "\n".join(lines)


def write_reports(report: dict, output_dir: str) -> None:
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    per_class = " | ".join(f"{k} {v:.0%}" for k, v in report["t2i_per_class"].items())
    md = [
        "# OmniMamba demo: evaluation on held-out digits",
        "",
        *[f"- {line}" for line in format_summary(report).splitlines()],
        f"- T2I per class: {per_class}",
        "",
        "Files: `t2i_samples.png` (per class: greedy, then sampled; red frame = the SVM disagrees with the prompt), "
        "`mmu_examples.png` (held-out digits with the model's answers; red = wrong), `report.json`.",
        "",
    ]
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))


__all__ = [
    "answer_questions",
    "classify_images",
    "evaluate_demo",
    "format_summary",
    "generate_images",
    "save_mmu_examples",
    "save_t2i_grid",
    "train_reference_classifier",
    "write_reports",
]
