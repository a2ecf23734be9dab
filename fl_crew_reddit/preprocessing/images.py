"""Images of image posts: verified and converted with Pillow, resized to MAX_IMAGE_SIZE, stored by content hash.

`normalise_image` turns any image bytes into one canonical form (RGB, EXIF orientation applied, longest side at
most MAX_IMAGE_SIZE, PNG) or raises `ImageRejected` with a counted reason; `store_png` writes it once under the
SHA-256 of those bytes, so the same picture posted twice (or in two sizes that normalise alike) is stored once.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression-bomb guard that does not depend on Pillow's global default: a 20-kB PNG can declare 50k×50k
# pixels. 40 MP is above any real Reddit upload (i.redd.it serves at most ~20 MP) and decodes in ~160 MB as RGB.
MAX_IMAGE_PIXELS = 40_000_000
HASH_CHARS = 32  # hex digits of SHA-256 kept in file names: 128 bits, no collisions in practice

# Reasons an image is left out; the keys of the preprocessing report's `dropped` counts.
SKIP_IMAGE_EMPTY = "image_empty"
SKIP_NOT_AN_IMAGE = "image_not_an_image"
SKIP_IMAGE_BROKEN = "image_broken_or_truncated"
SKIP_IMAGE_TOO_LARGE = "image_too_many_pixels"
SKIP_IMAGE_MISSING = "image_missing"


class MediaRejected(ValueError):
    """A media file cannot be used; `reason` is the skip count it goes under in the preprocessing report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ImageRejected(MediaRejected):
    """The bytes are not a usable image; `reason` is one of the SKIP_IMAGE_* counts."""


@dataclass(frozen=True)
class StoredImage:
    path: Path
    sha256: str  # the first HASH_CHARS hex digits: the file's stem and the key of its CLIP features


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a plain convert() turns transparent pixels black)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def fit_and_encode(image: Image.Image, max_size: int) -> bytes:
    """Longest side at most `max_size` (aspect kept, never enlarged), as optimised PNG bytes."""
    image = to_rgb(image)
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def normalise_image(data: bytes, max_size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """Image bytes of any format Pillow reads → canonical PNG bytes; raises ImageRejected with the reason."""
    if not data:
        raise ImageRejected(SKIP_IMAGE_EMPTY, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageRejected(SKIP_IMAGE_TOO_LARGE, f"{width}x{height} pixels is over the "
                                                              f"{max_pixels:,}-pixel limit")
                probe.verify()  # checksums and structure, without decoding the pixels
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated file fails here
                upright = ImageOps.exif_transpose(image)
                return fit_and_encode(upright, max_size)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(SKIP_NOT_AN_IMAGE, "not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(SKIP_IMAGE_TOO_LARGE, str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # truncated data, bad chunks, bad EXIF
        raise ImageRejected(SKIP_IMAGE_BROKEN, f"{type(error).__name__}: {error}") from None


def store_png(png: bytes, out_dir: Path) -> StoredImage:
    """Write normalised PNG bytes once under their content hash."""
    digest = hashlib.sha256(png).hexdigest()[:HASH_CHARS]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{digest}.png"
    if not target.exists():
        partial = target.with_suffix(".png.tmp")
        partial.write_bytes(png)
        partial.replace(target)
    return StoredImage(target, digest)


def store_image_bytes(data: bytes, out_dir: Path, max_size: int) -> StoredImage:
    return store_png(normalise_image(data, max_size), out_dir)

