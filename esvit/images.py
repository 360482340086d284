"""Image decoding shared by pretraining and evaluation: one function from stored bytes to RGB.

Both sides of the project read images the same way, so a photo is never trained on in one
orientation and evaluated in another:

* `read_image_bytes`: the encoded bytes of an undecoded `datasets.Image` value (bytes, a local
  path, or a remote path of a streamed dataset);
* `decode_image`: bytes -> fully decoded RGB `PIL.Image`, with the EXIF orientation applied
  (`ImageOps.exif_transpose`: a phone photo tagged "rotate 90°" comes out upright), any mode
  (L, P, RGBA, CMYK, 16-bit, float) converted to 8-bit RGB, a pixel cap against decompression
  bombs, and JPEG draft decoding (the decoder's own 1/2, 1/4, 1/8 downscaling) when the caller
  says how small the image may become;
* `to_rgb`: an already decoded image (PIL, numpy array, `datasets` dict) -> RGB.

Every failure is an `UndecodableImage`, which the data pipelines catch to skip, count and name the
image instead of stopping the run.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

#: ImageNet channel statistics used by every released EsViT model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default pixel cap (width x height) of `decode_image`: 40 Mpx, well below PIL's own bomb limit
#: (179 Mpx, a warning only below 2x that), so a small file cannot claim gigabytes when decoded.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

#: Column names tried, in order, when a dataset's image column is not named and no column has the
#: `datasets.Image` feature type.
IMAGE_COLUMN_GUESSES = ("image", "img", "images", "picture", "pixel_values")


class UndecodableImage(Exception):
    """An image whose bytes cannot be read or decoded, or that exceeds the pixel cap."""


def read_image_bytes(value: dict | bytes | str) -> bytes:
    """The encoded bytes of an undecoded `datasets.Image` value (bytes, or a local / remote path)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    if not path:
        raise UndecodableImage("the value holds neither bytes nor a path")
    # `xopen` reads local files and the remote paths of streamed datasets (hf://, zip://...::https://).
    from datasets.utils.file_utils import xopen

    try:
        with xopen(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err


def decode_image(
    raw: bytes,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Decode fully (so truncated files fail here, not later), upright, as 8-bit RGB.

    Args:
        raw: the encoded file.
        max_pixels: refuse images of more pixels than this (read from the header, before any
            pixel is decoded); None disables the cap.
        min_side: for JPEGs, let the decoder downscale by 2, 4 or 8 while the shorter side stays
            at least this large (`Image.draft`), which costs a fraction of a full decode. None
            decodes at full size.
    """
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise UndecodableImage(
                f"{width}x{height} = {width * height / 1e6:.1f} Mpx exceeds the cap of {max_pixels / 1e6:.1f} Mpx "
                "(--max_image_pixels)"
            )
        if min_side is not None and image.format == "JPEG":
            # `draft` keeps the size >= the requested one; orientation swaps sides but not the minimum.
            scale = max(1, min(width, height) // max(1, min_side))
            if scale >= 2:
                image.draft("RGB", (max(1, width // scale), max(1, height // scale)))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except UndecodableImage:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... per format
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err


def pick_image_column(dataset, wanted: str | None) -> str:
    """The image column of a `datasets` (Iterable)Dataset: `wanted`, else the first column of
    feature type `datasets.Image`, else the first of `IMAGE_COLUMN_GUESSES` present."""
    import datasets

    features = dataset.features
    names = list(features) if features is not None else list(dataset.column_names or [])
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"image column {wanted!r} not found; columns are {names}.")
        return wanted
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
    for guess in IMAGE_COLUMN_GUESSES:
        if guess in names:
            return guess
    raise ValueError(f"no image column among {names}; name it with --image_column.")


def to_rgb(image) -> Image.Image:
    """Any decoded image (PIL of any mode, numpy array, `datasets` dict) as an RGB PIL image."""
    if isinstance(image, dict):  # undecoded `datasets.Image` value
        return decode_image(read_image_bytes(image))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_to_uint8(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, numpy array or datasets image dict, got {type(image).__name__}.")
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own conversion of 16-bit / 32-bit / float grey images to RGB clips at 255.
        image = Image.fromarray(_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16")))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _to_uint8(array: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """8-bit copy of an image array: 16-bit integers are rescaled, floats in [0, 1] stretched."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    if array.dtype.kind in "ui":
        if sixteen_bit or (array.size and array.max() > 255):
            values = values * (255.0 / 65535.0)
    elif array.size and array.min() >= 0.0 and array.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_COLUMN_GUESSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UndecodableImage",
    "decode_image",
    "pick_image_column",
    "read_image_bytes",
    "to_rgb",
]
