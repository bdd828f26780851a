"""Image inputs and outputs: what users hand in, and the PNG bytes they get back."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import numpy.typing as npt
from PIL import Image

from sfumato.errors import InvalidParameterError

ImageArray = npt.NDArray[np.uint8]
"""An image as the engine takes and gives it: ``(height, width, channels)`` uint8."""

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", Image.Image, np.ndarray]
"""An image as users give it: PNG/JPEG bytes, a file path, a PIL image, or a
``(height, width[, channels])`` uint8 numpy array."""

# Decompression-bomb guard: refuse inputs over 64 megapixels.
MAX_INPUT_PIXELS = 64 * 1024 * 1024


def _open(value: ImageInput, field: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        source: io.BytesIO | Path = io.BytesIO(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        source = Path(value)
        if not source.is_file():
            raise InvalidParameterError(field, f"no image file at {str(source)!r}")
    else:
        raise InvalidParameterError(
            field, f"expected PNG/JPEG bytes, a path, a PIL image or a numpy array, got {type(value).__name__}"
        )
    try:
        image = Image.open(source)
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InvalidParameterError(
                field, f"image has {image.width}x{image.height} pixels, over {MAX_INPUT_PIXELS}"
            )
        image.load()
    except InvalidParameterError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidParameterError(field, f"not a readable image ({exc})") from None
    return image


def to_array(value: ImageInput, field: str, mode: str = "RGB") -> ImageArray:
    """Decode ``value`` into a contiguous ``(height, width, channels)`` uint8 array.

    ``mode`` is ``"RGB"`` (3 channels) or ``"L"`` (1 channel, for masks).

    Raises
    ------
    InvalidParameterError
        Naming ``field`` when the value is not an image or has the wrong shape.
    """
    channels = 3 if mode == "RGB" else 1
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:
            raise InvalidParameterError(field, f"numpy images must be uint8, got {array.dtype}")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise InvalidParameterError(field, f"expected shape (height, width[, 1|3|4]), got {value.shape}")
        if array.shape[2] != channels:
            array = np.asarray(Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array).convert(mode))
    else:
        array = np.asarray(_open(value, field).convert(mode))
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array, dtype=np.uint8)


def resize(
    array: ImageArray, width: int, height: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> ImageArray:
    """Resample an image to ``width`` x ``height`` (Lanczos unless told otherwise)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    squeezed = array.squeeze(2) if array.shape[2] == 1 else array
    image = Image.fromarray(squeezed).resize((width, height), resample)
    out = np.asarray(image)
    return np.ascontiguousarray(out[:, :, None] if out.ndim == 2 else out)


def composite(generated: ImageArray, source: ImageArray, mask: ImageArray) -> ImageArray:
    """Inpainting's last step: ``generated`` where ``mask`` is white, ``source``
    where it is black, blended in between (all three the same size).

    The engine blends only latents, so without this the pixels outside the mask
    would be the VAE's reconstruction of the source, not the source itself.
    """
    alpha = mask.astype(np.float32) / 255.0
    mixed = generated.astype(np.float32) * alpha + source.astype(np.float32) * (1.0 - alpha)
    return np.ascontiguousarray(np.rint(mixed), dtype=np.uint8)


def encode_png(array: ImageArray) -> bytes:
    """Encode an ``(height, width, 3)`` uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> ImageArray:
    """Decode PNG (or JPEG) bytes into an ``(height, width, 3)`` uint8 array."""
    return to_array(data, "image")
