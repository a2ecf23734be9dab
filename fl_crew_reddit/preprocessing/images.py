"""Images of image posts: verified and converted with Pillow, resized to MAX_IMAGE_SIZE, stored by content hash."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def store_image(source: Path, out_dir: Path, max_size: int) -> tuple[Path | None, str | None]:
    """(stored path, None) or (None, reason). The stored name is the SHA-256 of the normalised PNG bytes."""
    try:
        with Image.open(source) as probe:
            probe.verify()  # catches truncated and non-image files before decoding
        with Image.open(source) as image:
            image = image.convert("RGB")
            image.thumbnail((max_size, max_size))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
    except FileNotFoundError:
        return None, "image_missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, "image_unreadable"
    data = buffer.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not target.exists():
        target.write_bytes(data)
    return target, None
