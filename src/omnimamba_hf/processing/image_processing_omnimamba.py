"""Image processor for OmniMamba (ORIGINAL-SPEC §2.2, §5.5, §7.5).

Understanding (MMU) input, the original's "resize-naive" transform done once for both vision towers:
PIL `.convert("RGB")` → PIL `resize((S, S), BICUBIC)` (a squash, aspect ratio ignored) → `/255` → normalise twice,
DINOv2 (ImageNet mean/std) and SigLIP (0.5/0.5). `pixel_values` is one float tensor `(n_images, 2, 3, S, S)`:
`[:, 0]` for DINOv2, `[:, 1]` for SigLIP (CONVENTIONS §3: flat tensors, no dict).

Generation (T2I) output: `postprocess` maps VQ-decoded pixels in [-1, 1] to PIL images (§5.5), and
`preprocess_for_vq` reproduces the VQ training-image preprocessing (§7.5).

The whole pipeline is PIL + numpy, so it needs no torchvision; the same class serves the "pil" and "torchvision"
backend names. Differences from transformers' generic loaders, kept for parity with the original: RGBA/LA/palette
images are converted with PIL's plain `.convert("RGB")` (alpha dropped, not composited on white), and local files
are opened without EXIF rotation (URLs go through `transformers.image_utils.load_image`, which applies it).
"""

from __future__ import annotations

import base64
import binascii
import io
import os

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.image_utils import load_image as _hf_load_image
from transformers.processing_utils import ImagesKwargs

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm IMAGENET_INCEPTION
# Largest accepted input (width × height): 2**26 = 67,108,864 pixels, e.g. 8192 × 8192. Anything bigger is almost
# certainly a mistake or a decompression bomb, and would be squashed to 384 × 384 anyway.
MAX_IMAGE_PIXELS = 2**26


class OmniMambaImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    siglip_image_mean (`list[float]`, *optional*, defaults to `(0.5, 0.5, 0.5)`): mean of the SigLIP view.
    siglip_image_std (`list[float]`, *optional*, defaults to `(0.5, 0.5, 0.5)`): std of the SigLIP view.
    max_image_pixels (`int`, *optional*, defaults to `2**26`): inputs with more pixels are rejected.
    """

    siglip_image_mean: float | list[float] | tuple[float, ...] | None
    siglip_image_std: float | list[float] | tuple[float, ...] | None
    max_image_pixels: int | None


def _open(data: bytes, name: str) -> PIL.Image.Image:
    if len(data) == 0:
        raise ValueError(f"Image {name} is empty (0 bytes).")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()  # decode now, so corrupt or truncated data fails here with a clear message
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"Image {name} is too large: {err}") from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Could not read {name} as an image (not an image file, or corrupt): {err}") from err
    return image


def load_image(source) -> PIL.Image.Image:
    """Load a path, `http(s)://` URL, `data:image/...;base64,` URI, bare base64 string or raw bytes as a PIL image."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return _open(bytes(source), "given as bytes")
    if not isinstance(source, str):
        raise TypeError(f"Cannot load an image from {type(source).__name__}.")
    if source.startswith(("http://", "https://")):
        return _hf_load_image(source)
    if os.path.isfile(source):
        with open(source, "rb") as f:
            return _open(f.read(), repr(source))
    payload = source.split(",", 1)[1] if source.startswith("data:") else source
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        shown = source if len(source) < 80 else source[:77] + "..."
        raise ValueError(f"{shown!r} is not an existing file, an http(s) URL or base64 image data.") from None
    return _open(data, "given as base64")


class OmniMambaImageProcessor(PilBackend):
    r"""
    Constructs an OmniMamba image processor: one squash-resize to `size` and two normalisations (DINOv2 and SigLIP),
    stacked as `pixel_values` of shape `(n_images, 2, 3, height, width)` (ORIGINAL-SPEC §2.2).

    Inputs: PIL images (any mode), numpy arrays (HWC/CHW/HW, uint8 or float; floats in [0, 1] are scaled by 255),
    torch tensors (CHW or HW), file paths, http(s) URLs, base64 strings / data URIs, raw bytes.

    Example:

    ```python
    >>> from PIL import Image
    >>> from omnimamba_hf.processing import OmniMambaImageProcessor
    >>> processor = OmniMambaImageProcessor()
    >>> processor(Image.new("RGB", (640, 480)))["pixel_values"].shape
    torch.Size([1, 2, 3, 384, 384])
    ```
    """

    _auto_class = "AutoImageProcessor"  # save_pretrained copies this code next to the files

    valid_kwargs = OmniMambaImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 384, "width": 384}
    image_mean = DINO_MEAN
    image_std = DINO_STD
    siglip_image_mean = SIGLIP_MEAN
    siglip_image_std = SIGLIP_STD
    max_image_pixels = MAX_IMAGE_PIXELS
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    return_tensors = "pt"

    # ---- loading ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "OmniMambaImageProcessor":
        """The image processor matching an `OmniMambaConfig`'s vision towers (size and both normalisations)."""
        vision = config.vision_config
        return cls(
            size={"height": vision.image_size, "width": vision.image_size},
            image_mean=list(vision.dino_image_mean),
            image_std=list(vision.dino_image_std),
            siglip_image_mean=list(vision.siglip_image_mean),
            siglip_image_std=list(vision.siglip_image_std),
            **kwargs,
        )

    def fetch_images(self, images):
        """Load every str / path / bytes entry (nested lists are kept); images pass through unchanged."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(x) for x in images]
        if isinstance(images, (str, bytes, bytearray, os.PathLike)):
            return load_image(images)
        return images

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        """A flat list of single images (nested lists and 4-D batches are flattened; 2-D arrays are greyscale)."""
        flat = []

        def add(x):
            if isinstance(x, (list, tuple)):
                for y in x:
                    add(y)
            elif isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 4:
                flat.extend(list(x))
            else:
                flat.append(x)

        add(self.fetch_images(images))
        if not flat:
            raise ValueError("No image was given.")
        return flat

    def process_image(self, image, max_image_pixels: int | None = None, **kwargs) -> PIL.Image.Image:
        """One input → a validated RGB PIL image (the original converts with PIL `.convert("RGB")`)."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3, 4) else image
            image = image.numpy()
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image)
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"Unsupported image type {type(image).__name__}.")
        if image.mode in _WIDE_MODES:  # 16-bit / 32-bit / float images: `.convert("RGB")` would clip them to white
            image = _array_to_pil(np.asarray(image))
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"Image has zero size ({width} × {height}).")
        limit = max_image_pixels or self.max_image_pixels
        if width * height > limit:
            raise ValueError(f"Image of {width} × {height} pixels exceeds the limit of {limit} pixels (max_image_pixels).")
        return image.convert("RGB")

    # ---- MMU preprocessing (§2.2) -----------------------------------------------------------------------------------

    def _preprocess(
        self,
        images: list[PIL.Image.Image],
        do_resize: bool,
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        siglip_image_mean=None,
        siglip_image_std=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        siglip_image_mean = self.siglip_image_mean if siglip_image_mean is None else siglip_image_mean
        siglip_image_std = self.siglip_image_std if siglip_image_std is None else siglip_image_std
        out = []
        for image in images:
            if do_resize:  # squash to (height, width), PIL's antialiased bicubic, as torchvision's Resize on PIL
                image = image.resize((size.width, size.height), resample=resample)
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # CHW
            if do_rescale:  # ToTensor divides by 255 (multiplying by 1/255 can differ by one ulp, §9.9)
                pixels = pixels / np.float32(255.0) if abs(rescale_factor - 1 / 255) < 1e-12 else pixels * rescale_factor
            views = [pixels, pixels]
            if do_normalize:
                views = [_normalize(pixels, image_mean, image_std), _normalize(pixels, siglip_image_mean, siglip_image_std)]
            out.append(np.stack(views))
        return BatchFeature(data={"pixel_values": np.stack(out)}, tensor_type=return_tensors)

    # ---- T2I output (§5.5) ------------------------------------------------------------------------------------------

    def postprocess(self, images, return_tensors: str | None = "PIL.Image.Image", **kwargs):
        """VQ-decoded pixels in [-1, 1], `(B, 3, H, W)` (or one `(3, H, W)`, or a list) → `clamp(-1, 1)`, `(x + 1) / 2`,
        `× 255`, round, uint8. Returns a list of PIL images (default), or a uint8 `(B, H, W, 3)` numpy array
        (`return_tensors="np"`) or `(B, 3, H, W)` tensor (`"pt"`)."""
        if isinstance(images, (list, tuple)):
            pixels = torch.stack([torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x) for x in images])
        else:
            pixels = torch.as_tensor(images if torch.is_tensor(images) else np.asarray(images))
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"Expected pixels of shape (batch, 3, height, width), got {tuple(pixels.shape)}.")
        if not pixels.is_floating_point():
            raise ValueError("Expected float pixels in [-1, 1]; decode image token ids with the VQ model first.")
        pixels = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        if return_tensors == "pt":
            return pixels
        array = pixels.permute(0, 2, 3, 1).numpy()
        if return_tensors == "np":
            return array
        return [PIL.Image.fromarray(a) for a in array]

    # ---- VQ training images (§7.5) ----------------------------------------------------------------------------------

    def preprocess_for_vq(self, images, size: int = 256) -> torch.Tensor:
        """Centre crop to the shorter side (rows/cols `(H - s) // 2` to `(H + s) // 2`), PIL LANCZOS resize to
        `size`, `x / 127.5 - 1` → float `(3, size, size)` for one image, `(B, 3, size, size)` for a list."""
        single = not isinstance(images, (list, tuple))
        out = []
        for image in self._prepare_images_structure(images):
            array = np.asarray(self.process_image(image), dtype=np.uint8)
            h, w = array.shape[:2]
            s = min(h, w)
            array = array[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
            array = np.asarray(PIL.Image.fromarray(array).resize((size, size), PIL.Image.LANCZOS)).astype(np.float32)
            out.append(torch.from_numpy((array / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1).copy()))
        return out[0] if single and len(out) == 1 else torch.stack(out)


def _normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


# PIL modes whose values are not 8-bit: read through numpy and scaled to 8 bits like arrays (16-bit PNGs open as I;16)
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit values of an image array (the original only ever sees 8-bit images): uint16 and integers above 255 are
    read as 16-bit (÷ 257), other integers as 8-bit; floats as [0, 1] when their max is ≤ 1, else as [0, 255].
    Anything outside these ranges is refused rather than clipped."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Cannot read an array of dtype {array.dtype} as an image.")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The image array holds NaN or infinite values.")
    low, high = values.min(), values.max()
    if np.issubdtype(array.dtype, np.integer):
        wide = array.dtype == np.uint16 or high > 255
        if low < 0 or high > (65535 if wide else 255):
            raise ValueError(f"Integer image values span [{low:g}, {high:g}]; expected [0, 255] or 16-bit [0, 65535].")
        values = values / 257.0 if wide else values
    else:
        if low < 0 or high > 255:
            raise ValueError(f"Float image values span [{low:g}, {high:g}]; expected [0, 1] or [0, 255].")
        values = values * 255.0 if high <= 1.0 else values
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """HWC / CHW / HW array → 8-bit PIL image (`_to_uint8` says how values are read)."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Cannot read an array of shape {array.shape} as an image (expected HW, HWC or CHW).")
    if array.size == 0:
        raise ValueError(f"Image has zero size (array shape {array.shape}).")
    return PIL.Image.fromarray(_to_uint8(array))


__all__ = ["OmniMambaImageProcessor", "MAX_IMAGE_PIXELS", "load_image"]
