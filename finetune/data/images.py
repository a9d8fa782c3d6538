"""Open one image value (a path, a file:// or data: URL, a URL-less HF image dict, raw bytes or a PIL image) as RGB,
on demand."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse
from urllib.request import url2pathname

import numpy as np
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
    text = str(value)
    scheme = text.split(":", 1)[0].lower() if ":" in text[:12] else ""
    if scheme == "data":  # OpenAI-style inline image: data:image/png;base64,...
        return _decode(io.BytesIO(_data_url_bytes(text)), "data: URL image")
    if scheme in ("http", "https"):
        raise DataError(f"image URLs are not fetched ({value}); download the images and use paths")
    path = _file_url_path(text) if scheme == "file" else Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    return _decode(path, str(path))


def _file_url_path(url: str) -> Path:
    """file:///abs/a.jpg and file://localhost/abs/a.jpg are absolute; file://images/a.jpg is taken as relative."""
    parsed = urlparse(url)
    if parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    return Path(unquote(parsed.netloc + parsed.path))


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise DataError("malformed data: URL image (no comma before the data)")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"malformed data: URL image (bad base64: {err})") from None
    return unquote_to_bytes(payload)


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            # Phone photos store their rotation in EXIF; processors read raw pixels, so apply it here.
            return _rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # The reason goes last so that reports group "unreadable image" rows together.
        raise DataError(f"unreadable image: {name} ({str(err).strip() or type(err).__name__})") from None


def _rgb(image: Image.Image) -> Image.Image:
    # Palette, greyscale, CMYK and alpha images all become 3-channel RGB, what every processor expects.
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (scientific and medical PNG/TIFF) scaled to 8 bits; convert() would clip it to white."""
    pixels = np.asarray(image)
    if pixels.max(initial=0) <= 255:  # 8-bit values stored in a 32-bit mode
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return Image.fromarray((pixels.clip(0, 65535) / 257).round().astype(np.uint8))
