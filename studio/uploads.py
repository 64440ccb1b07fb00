"""Checks an uploaded file and turns it into a clean JPEG, or refuses it with a reason.

Formats are recognised by content, not by name. The image is decoded once, uprighted by its
EXIF orientation, and re-encoded from pixels, so no metadata block (EXIF, GPS, XMP, ICC,
comments) and nothing appended to the file survives. Pillow's decompression-bomb warning is
an error here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.utils.translation import gettext_lazy as _
from PIL import Image, UnidentifiedImageError
from pillow_heif import register_heif_opener

from pipeline.preprocess import load_photo

register_heif_opener()

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "HEIF"}
STORED_LONG_SIDE = 3000  # enough for a 512 px face crop from any selfie; keeps storage small


@dataclass(frozen=True)
class Refusal:
    """Why a file was refused, in words for the person who sent it."""

    name: str
    message: str


class RefusedFile(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _decode(data: bytes) -> Image.Image:
    """Header checks first (format, pixel count), then the full decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise RefusedFile(_("This kind of file is not supported. Please send a JPEG, PNG, WebP or HEIC photo."))
            if image.width * image.height > settings.PHOTO_MAX_PIXELS:
                raise RefusedFile(_("This image has too many pixels. Please send a smaller photo."))
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise RefusedFile(_("This image has too many pixels. Please send a smaller photo.")) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            raise RefusedFile(_("This file is not a photo we can read, or it is damaged.")) from None
    return image


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale (PNG "I;16"/"I") scaled to 8 bits; other modes unchanged."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 else 255.0
        return Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return image


def clean_photo(upload: UploadedFile) -> bytes:
    """The upload as a metadata-free JPEG, or RefusedFile with a message for the person."""
    if not upload.size:
        raise RefusedFile(_("This file is empty."))
    if upload.size > settings.PHOTO_MAX_BYTES:
        raise RefusedFile(
            _("This file is larger than %(megabytes)d MB.") % {"megabytes": settings.PHOTO_MAX_BYTES // 2**20}
        )
    image = _decode(upload.read())
    rgb = load_photo(_to_8_bit(image))
    if rgb is None:
        raise RefusedFile(_("This file is not a photo we can read, or it is damaged."))
    rgb.thumbnail((STORED_LONG_SIDE, STORED_LONG_SIDE), Image.Resampling.LANCZOS)
    # A new image from the pixels alone: Pillow would otherwise carry `info` (a JPEG comment,
    # for one) into the saved file.
    pixels_only = Image.fromarray(np.asarray(rgb))
    out = io.BytesIO()
    pixels_only.save(out, "JPEG", quality=92, optimize=True)
    return out.getvalue()
