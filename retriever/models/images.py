"""Reading query images safely, and expanding files, folders and globs into image paths."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully, as RGB.

    Raises:
        ImageError: missing, empty, not an image, truncated, or over Pillow's pixel limit
            (a likely decompression bomb). The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(str(path), "no such file", kind="missing")
    if path.is_dir():
        raise ImageError(str(path), "is a directory, not an image", kind="missing")
    return _decode(path, str(path), path.stat().st_size)


def image_from_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """`load_image` for bytes already in memory (uploads); `name` labels errors."""
    import io

    return _decode(io.BytesIO(data), name, len(data))


def _decode(source, name: str, size: int) -> Image.Image:
    import warnings

    from PIL import Image, UnidentifiedImageError

    if size == 0:
        raise ImageError(name, "empty file (0 bytes)", kind="empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"refused: too many pixels, a possible decompression bomb ({e})", kind="too_large") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image Pillow can read", kind="not_image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"broken or truncated image ({e})", kind="broken") from None


def expand_image_paths(patterns: list[str]) -> list[Path]:
    """Files stay as given, folders give their image files (sorted), globs expand.

    A path that does not exist and matches nothing is kept, so that the caller reports it.
    """
    paths: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()))
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            paths.extend(Path(m) for m in matches if Path(m).is_file())
            if not matches:
                paths.append(p)
        else:
            paths.append(p)
    return paths
