"""Checking and preparing a user's image before it reaches a model.

Uploads arrive as file paths (``gr.Image(type="filepath")``) so that a file that is not an
image, or a decompression bomb, is caught here with a message instead of failing inside
Gradio's own preprocessing. The size is read from the header before the pixels are
decoded; a very large (but sane) image is downscaled, since the vision tower resizes to
its own small input anyway.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # refuse beyond this (~6300x6300): decoding alone would take seconds and GBs
MAX_SIDE = 1024  # downscale beyond this; the models here look at 64..384 px


class ImageError(ValueError):
    """An image that cannot be used, with the message to show."""


def load_user_image(source: str | Path | Image.Image | None) -> tuple[Image.Image, str]:
    """RGB image and a note ("" or what was done to it); raises :class:`ImageError`."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ImageError("Please add an image first: upload one or click an example image.")
    if isinstance(source, Image.Image):
        return _fit(source.convert("RGB"))
    path = Path(source)
    if not path.is_file():
        raise ImageError("The uploaded image could not be found on the server; please upload it again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"The image is too large ({w}x{h} pixels, {w * h / 1e6:.0f} megapixels; "
                        f"at most {MAX_PIXELS / 1e6:.0f}). Please upload a smaller one."
                    )
                img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size directly
                rgb = img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):
            raise ImageError(
                f"'{path.name}' is not an image this app can read (PNG, JPEG, WebP, GIF, BMP...)."
            ) from err
        raise ImageError("The image is too large to decode safely. Please upload a smaller one.") from err
    except OSError as err:
        raise ImageError(f"'{path.name}' could not be read as an image (it may be truncated or corrupt).") from err
    return _fit(rgb)


def _fit(img: Image.Image) -> tuple[Image.Image, str]:
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError("The image is empty (zero pixels).")
    if max(w, h) <= MAX_SIDE:
        return img, ""
    img = img.copy()
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img, f"The image ({w}x{h}) was downscaled to {img.size[0]}x{img.size[1]} before answering."
