"""Open one image value (a path, a URL-less HF image dict, raw bytes or a PIL image) as RGB, on demand."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import DataError


def open_image(value, root: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        return _rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict):  # a datasets Image feature that was not decoded
        if value.get("bytes"):
            return _decode(io.BytesIO(value["bytes"]), "embedded image")
        value = value.get("path")
    if isinstance(value, bytes):
        return _decode(io.BytesIO(value), "embedded image")
    if not isinstance(value, (str, Path)) or not str(value):
        raise DataError(f"unsupported image value {type(value).__name__}")
    if str(value).startswith(("http://", "https://")):
        raise DataError(f"image URLs are not fetched ({value}); download the images and use paths")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    return _decode(path, str(path))


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            # Phone photos store their rotation in EXIF; processors read raw pixels, so apply it here.
            return _rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"unreadable image {name}: {err}") from None


def _rgb(image: Image.Image) -> Image.Image:
    # Palette, greyscale, CMYK and alpha images all become 3-channel RGB, what every processor expects.
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")
