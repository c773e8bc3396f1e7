"""`omnimamba-hf demo`, `omnimamba-hf describe` and `omnimamba-hf generate-image`.

    omnimamba-hf demo [--output-dir DIR] [--force] [--quick]
    omnimamba-hf describe IMAGE [--question "What digit is this?"] [--model DIR_OR_HUB_ID]
    omnimamba-hf generate-image "a handwritten seven" -o out.png [--model DIR_OR_HUB_ID] [--seed N --top-k K]

`demo` trains the embedded tiny OmniMamba on scikit-learn's digits once (about five minutes on two CPU cores, `--quick`
about two), caches it as a normal `save_pretrained` directory (`DIR/model`), then evaluates it on the held-out digits
and writes `DIR/report.md`, `DIR/report.json`, `DIR/t2i_samples.png`, `DIR/mmu_examples.png` (and a held-out digit,
`DIR/example_digit.png`, to try `describe` on). Later runs load the
cache. DIR defaults to `$OMNIMAMBA_HF_DEMO_DIR`, else `~/.cache/omnimamba-hf/demo` (`demo-quick` with `--quick`).

`describe` and `generate-image` work on any OmniMamba directory or Hub id (`--model`); without one they use the demo
model.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import time

ENV_VAR = "OMNIMAMBA_HF_DEMO_DIR"


def default_demo_dir(quick: bool = False) -> str:
    base = os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "omnimamba-hf", "demo")
    return base + "-quick" if quick and not os.environ.get(ENV_VAR) else base


def demo_model_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "model")


def _cached_recipe(output_dir: str) -> dict | None:
    path = os.path.join(demo_model_dir(output_dir), "demo_info.json")
    if not os.path.isfile(os.path.join(demo_model_dir(output_dir), "config.json")) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stale_exported_code(model_dir: str) -> list[str]:
    """The `trust_remote_code` files in a saved directory that differ from this package's modules of the same name
    (a cache written by an older version of the package)."""
    import omnimamba_hf

    root = os.path.dirname(os.path.abspath(omnimamba_hf.__file__))
    stale = []
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".py"):
            continue
        sources = [os.path.join(root, sub, name) for sub in ("modeling", "processing")]
        source = next((path for path in sources if os.path.isfile(path)), None)
        if source is None or not filecmp.cmp(source, os.path.join(model_dir, name), shallow=False):
            stale.append(name)
    return stale


def refresh_exported_code(model_dir: str, stale: list[str]) -> None:
    """Re-save a cached model with this package's code (the weights are unchanged), so that loading it with
    `trust_remote_code=True` where the package is not installed runs the code that wrote it. `stale`: the files
    `stale_exported_code` named."""
    model, processor = load_model(model_dir, device="cpu")
    for name in stale:
        os.remove(os.path.join(model_dir, name))  # modules the package no longer has are not left behind
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)


class _threads:
    """`torch.set_num_threads(n)` for the duration of a command (restored afterwards: the commands are also called
    in-process, e.g. by the tests). `n` 0 or None: unchanged."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


def load_model(source: str, device: str = "auto"):
    """`AutoModelForImageTextToText` + `AutoProcessor` from a directory or Hub id (float32, eval mode)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import omnimamba_hf  # noqa: F401 - registers the Auto classes

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    return model, processor


# ---- demo ---------------------------------------------------------------------------------------------------------------


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omnimamba-hf demo",
        description="Train (once, cached) and evaluate a tiny OmniMamba on scikit-learn's handwritten digits, offline on CPU.",
    )
    parser.add_argument("--output-dir", default=None, help=f"cache/output directory (default: ${ENV_VAR} or ~/.cache/omnimamba-hf/demo)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (CI smoke test); results are weaker")
    parser.add_argument("--no-eval", action="store_true", help="only build (or load) the model")
    parser.add_argument("--samples-per-class", type=int, default=None, help="sampled T2I images per digit class")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default: %(default)s; the demo's tensors are tiny, and one thread is as fast as two "
        "and far more robust when other processes share the cores; 0 = torch's choice)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    with _threads(args.threads):
        return _demo(args)


def _demo(args) -> int:
    from .train import RECIPE_VERSION, DemoRecipe, train_demo_model

    output_dir = os.path.abspath(args.output_dir or default_demo_dir(args.quick))
    recipe = DemoRecipe.quick() if args.quick else DemoRecipe.full()
    progress = not args.quiet
    cached = _cached_recipe(output_dir)
    usable = (
        cached is not None
        and cached.get("recipe_version") == RECIPE_VERSION
        and cached.get("recipe", {}).get("name") == recipe.name
    )
    start = time.time()
    if usable and not args.force:
        print(f"Using the cached demo model in {demo_model_dir(output_dir)} (--force retrains).", flush=True)
        stale = stale_exported_code(demo_model_dir(output_dir))
        if stale:
            print("Its trust_remote_code files are from another version of omnimamba-hf; re-saving them.", flush=True)
            refresh_exported_code(demo_model_dir(output_dir), stale)
        train_report = cached
    else:
        if cached is not None and not args.force:
            print(f"The cached model in {output_dir} is from another recipe; retraining.", flush=True)
        print(
            f"Training the demo model ({recipe.name} recipe) into {output_dir}: a VQ tokenizer, stage-1 MMU and T2I, "
            "stage 2 on sklearn's digits.",
            flush=True,
        )
        train_report = train_demo_model(output_dir, recipe, progress=progress)
        print(f"Trained in {train_report['training_seconds']:.0f} s; saved to {demo_model_dir(output_dir)}", flush=True)
    if args.no_eval:
        return 0

    from .evaluate import evaluate_demo, format_summary

    model, processor = load_model(demo_model_dir(output_dir))
    samples = args.samples_per_class or recipe.t2i_samples_per_class
    report = evaluate_demo(
        model, processor, output_dir, max_eval_images=recipe.max_eval_images, samples_per_class=samples,
        seed=recipe.seed, progress=progress,
    )  # fmt: skip
    report["training_seconds"] = train_report.get("training_seconds")
    report["recipe"] = recipe.name
    report["wall_seconds_this_run"] = round(time.time() - start, 1)
    from .evaluate import write_reports

    write_reports(report, output_dir)
    print("\n" + format_summary(report))
    print(
        f"\nWrote {os.path.join(output_dir, 'report.md')}, report.json, t2i_samples.png, mmu_examples.png\n"
        f"Try:  omnimamba-hf describe {os.path.join(output_dir, 'example_digit.png')} --question \"What digit is this?\"\n"
        f"      omnimamba-hf generate-image \"a handwritten seven\" -o seven.png"
    )
    return 0


# ---- describe / generate-image -----------------------------------------------------------------------------------------


def _resolve_model(model: str | None) -> str:
    if model:
        return model
    for candidate in (default_demo_dir(), default_demo_dir(quick=True)):
        if _cached_recipe(candidate) is not None:
            return demo_model_dir(candidate)
    raise SystemExit(
        "No --model given and no demo model is cached yet: run `omnimamba-hf demo` first (about five minutes on CPU), "
        "or pass --model with an OmniMamba directory or Hub id."
    )


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but this torch build sees no CUDA device; use --device cpu (or auto).")


class _TokenProgress:
    """A `generate()` streamer that only advances a progress bar (one tick per generated token; the prompt is skipped).
    Shown where decoding is slow (CPU); on a GPU a streamer would take the choices out of the CUDA graph."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=None)  # None: off when stderr is not a terminal

    def put(self, value):
        self.bar.update(1)

    def end(self):
        self.bar.close()


def describe_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimamba-hf describe", description="Answer a question about an image (MMU).")
    parser.add_argument("image", help="image path, http(s) URL or base64 data")
    parser.add_argument(
        "--question", "-q", default=None,
        help="the question (default: 'What digit is this?' for the demo model, else the original's 'Please describe it "
        "in detail.')",
    )  # fmt: skip
    parser.add_argument("--model", "-m", default=None, help="OmniMamba directory or Hub id (default: the demo model)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        print(_describe(args))
    except (ValueError, OSError, TypeError) as err:  # bad image, prompt, model path or device: a message, not a trace
        print(f"omnimamba-hf describe: {err}", file=sys.stderr)
        return 1
    return 0


def _describe(args) -> str:
    import torch

    _check_device(args.device)
    source = _resolve_model(args.model)
    is_demo = os.path.isfile(os.path.join(source, "demo_info.json"))
    question = args.question or ("What digit is this?" if is_demo else "Please describe it in detail.")
    model, processor = load_model(source, args.device)
    messages = [{"role": "user", "content": [{"type": "image", "image": args.image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    room = model.config.mmu_max_position_embeddings + 1 - inputs["input_ids"].shape[1]
    if args.max_new_tokens > room:
        print(f"(the position table leaves room for {room} new tokens after this prompt; generating at most that)",
              file=sys.stderr)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=min(args.max_new_tokens, room), do_sample=False)
    return processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])[0].strip()


def generate_image_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimamba-hf generate-image", description="Generate an image from text (T2I).")
    parser.add_argument("prompt", help="the caption, e.g. 'a handwritten seven'")
    parser.add_argument("-o", "--output", default="generated.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument("--model", "-m", default=None, help="OmniMamba directory or Hub id (default: the demo model)")
    parser.add_argument("--seed", type=int, default=None, help="sample (top-k) with this seed instead of greedy decoding")
    parser.add_argument("--top-k", type=_positive_int, default=8, help="top-k when sampling (default: %(default)s)")
    parser.add_argument("--temperature", type=_positive_float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (not in the original)")
    parser.add_argument(
        "--upscale", type=_positive_int, default=None,
        help="nearest-neighbour upscale factor for the PNG (default: enough to reach 128 px; 1 keeps the native size)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("the prompt is empty")
    if not os.path.splitext(args.output)[1]:
        args.output += ".png"  # the help promises a PNG file
    try:
        print(_generate_image(args))
    except (ValueError, OSError, TypeError) as err:  # bad prompt, model path, output path or device
        print(f"omnimamba-hf generate-image: {err}", file=sys.stderr)
        return 1
    return 0


def _generate_image(args) -> str:
    import PIL.Image
    import torch

    _check_device(args.device)
    model, processor = load_model(_resolve_model(args.model), args.device)
    inputs = processor(text=[args.prompt], generation_mode="image", return_tensors="pt").to(model.device)
    kwargs = {"do_sample": False}
    if args.seed is not None:
        torch.manual_seed(args.seed)
        kwargs = {"do_sample": True, "top_k": args.top_k, "temperature": args.temperature}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if model.device.type == "cpu":
        kwargs["streamer"] = _TokenProgress(model.config.num_generated_image_tokens, "image tokens")
    with torch.no_grad():
        ids = model.generate(inputs["input_ids"], generation_mode="image", **kwargs)
        image = processor.postprocess(model.decode_image_tokens(ids))[0]
    native = image.size
    factor = args.upscale if args.upscale is not None else max(1, -(-128 // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    image.save(args.output)
    note = f", upscaled {factor}x from {native[0]}x{native[1]}" if factor > 1 else ""
    return f"Wrote {args.output} ({image.width}x{image.height}{note})"


__all__ = ["default_demo_dir", "demo_main", "demo_model_dir", "describe_main", "generate_image_main", "load_model"]
