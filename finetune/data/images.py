"""Open one image value (a path, a file:// or data: URL, a URL-less HF image dict, raw bytes or a PIL image) as RGB,
on demand; or read only its size from the file's header (the data check)."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from finetune.errors import DataError


def open_image(value, root: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        return _rgb(ImageOps.exif_transpose(value))
    return _decode(*_locate(value, root))


def image_size(value, root: Path) -> tuple[int, int] | None:
    """(width, height) of the image `open_image` would return (EXIF orientation applied), from the file's header
    and end marker alone; None when only decoding the pixels can tell whether the file is whole.

    JPEG must end with its EOI marker and PNG with IEND after nothing but image data, WebP must be as long as its
    RIFF header says; other formats, and files failing those checks (truncated ones), are left to a full decode.
    Raises the DataError `open_image` would raise for a missing, unidentifiable or oversized image."""
    if isinstance(value, Image.Image):
        return _oriented(value.size, value.getexif())
    source, name = _locate(value, root)
    try:
        with open(source, "rb") if isinstance(source, Path) else source as handle, Image.open(handle) as image:
            if not _complete(image.format, handle):
                return None
            # The base class's getexif reads what the header gave; PNG's override would decode the pixels to look
            # for EXIF after them, which _complete has ruled out.
            return _oriented(image.size, Image.Image.getexif(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"unreadable image: {name} ({str(err).strip() or type(err).__name__})") from None


def image_file(value, root: Path) -> Path | None:
    """The file an image value names (for its size and modification time), or None for in-row images."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return None
        value = value.get("path")
    if not isinstance(value, (str, Path)) or not str(value):
        return None
    text = str(value)
    scheme = text.split(":", 1)[0].lower() if ":" in text[:12] else ""
    if scheme and scheme != "file":
        return None
    path = _file_url_path(text) if scheme == "file" else Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _locate(value, root: Path) -> tuple[Path | io.BytesIO, str]:
    """Where an image value's bytes are, and its name for messages."""
    if isinstance(value, dict):  # a datasets Image feature that was not decoded
        if value.get("bytes"):
            return io.BytesIO(value["bytes"]), "embedded image"
        value = value.get("path")
    if isinstance(value, bytes):
        return io.BytesIO(value), "embedded image"
    if not isinstance(value, (str, Path)) or not str(value):
        raise DataError(f"unsupported image value {type(value).__name__}")
    text = str(value)
    scheme = text.split(":", 1)[0].lower() if ":" in text[:12] else ""
    if scheme == "data":  # OpenAI-style inline image: data:image/png;base64,...
        return io.BytesIO(_data_url_bytes(text)), "data: URL image"
    if scheme in ("http", "https"):
        raise DataError(f"image URLs are not fetched ({value}); download the images and use paths")
    path = _file_url_path(text) if scheme == "file" else Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    return path, str(path)


# Orientations 5-8 turn the picture a quarter: width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _oriented(size: tuple[int, int], exif) -> tuple[int, int]:
    width, height = size
    return (height, width) if exif.get(ExifTags.Base.Orientation) in _QUARTER_TURNS else (width, height)


def _complete(fmt: str | None, handle) -> bool:
    """Whether the file visibly ends where its format says it ends (a cut-off download does not)."""
    end = handle.seek(0, io.SEEK_END)
    if fmt == "JPEG":
        handle.seek(max(end - 2, 0))
        return handle.read(2) == b"\xff\xd9"
    if fmt == "PNG":
        return _png_complete(handle, end)
    if fmt == "WEBP":
        handle.seek(4)
        declared = int.from_bytes(handle.read(4), "little")
        return end >= declared + 8
    return False


def _png_complete(handle, end: int) -> bool:
    """PNG chunks, walked by their headers: image data then IEND at the end of the file, nothing in between (text or
    EXIF chunks after the pixels are only read by a decode)."""
    handle.seek(8)
    seen_data = False
    while True:
        header = handle.read(8)
        if len(header) < 8:
            return False
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if kind == b"IEND":
            handle.seek(-8, io.SEEK_CUR)
            return handle.tell() + 12 == end and handle.read(12) == _PNG_END
        if kind == b"IDAT":
            seen_data = True
        elif seen_data:
            return False
        position = handle.seek(length + 4, io.SEEK_CUR)
        if position > end:
            return False


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
