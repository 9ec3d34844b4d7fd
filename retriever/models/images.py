"""Reading images safely as people have them, and expanding files, folders and globs into image paths.

Phones store photos sideways with an EXIF orientation tag; scanners and microscopes write 16-bit
greyscale; some files are formats Pillow would hand to an outside program (EPS runs Ghostscript).
`load_image` turns all of these into the upright 8-bit RGB image a viewer would show, and only
opens the formats in `FORMATS`.
"""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Decoded in-process by Pillow; EPS/PS (Ghostscript) and other formats that shell out are never tried.
# Phone JPEGs that Pillow calls MPO (a second, preview image inside) open through JPEG.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# CLIP's transform scales the short side up to the model's size S, so a W x 1 image becomes
# S*W x S pixels: 375 bytes of 100000 x 1 PNG cost 2.7 GB. Images that would pass this bound are
# refused rather than padded: the model would see only the middle 1/ratio of them through its
# centre crop, so no vector for them means much, and a refusal leaves every normal image's
# vector exactly as it was.
MAX_RESIZED_PIXELS = 1 << 24
# Files are checked before the model is known, at the size most CLIP models use; the model's
# own preprocess checks again at its real size (see `SafePreprocess`).
REFERENCE_SIDE = 224
SOURCE_KEY = "retriever_source"  # Image.info key naming the file, for errors raised later


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully, as upright 8-bit RGB.

    Raises:
        ImageError: missing, empty, not an ordinary file, not an image (or a format outside
            `FORMATS`), truncated, over Pillow's pixel limit (a likely decompression bomb), or
            so elongated that resizing it for a model would be huge. The message names the file.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(str(path), "no such file", kind="missing") from None
    except OSError as e:
        raise ImageError(str(path), f"cannot be read ({e.strerror or e})", kind="missing") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(str(path), "is a directory, not an image", kind="missing")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or /dev/zero would block or never end
        raise ImageError(
            str(path), "is not an ordinary file (a FIFO, device or socket); give an image file", kind="not_image"
        )
    return _decode(path, str(path), st.st_size)


def image_from_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """`load_image` for bytes already in memory (uploads); `name` labels errors."""
    import io

    return _decode(io.BytesIO(data), name, len(data))


def check_shape(size: tuple[int, int], name: str, side: int = REFERENCE_SIDE) -> None:
    """Refuse an image whose short side scaled to `side` would exceed MAX_RESIZED_PIXELS.

    Raises:
        ImageError: kind `too_large`, naming the image and its size.
    """
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < 1 or side * side * (long / short) > MAX_RESIZED_PIXELS:
        limit = MAX_RESIZED_PIXELS // (side * side)
        raise ImageError(
            name,
            f"refused: {width}x{height} is too elongated (more than {limit}:1) to be "
            f"resized for the model; crop it to the part that matters",
            kind="too_large",
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB, with high-bit-depth greyscale scaled down rather than clipped to white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    return im.convert("RGB")  # a copy even when already RGB: the caller may close the original


class SafePreprocess:
    """A model's eval transform behind `to_rgb` and `check_shape` at the model's own size.

    Every path that turns a PIL image into pixels (encoding, captioning, interrogating, serving)
    calls `LoadedModel.preprocess`, so wrapping it there covers images that callers opened
    themselves too. Attributes (`transforms`, ...) are the wrapped transform's.
    """

    def __init__(self, transform: Any, side: int):
        self.transform = transform
        self.side = side

    def __call__(self, im: Image.Image) -> Any:
        check_shape(im.size, str(im.info.get(SOURCE_KEY, "image")), self.side)
        return self.transform(to_rgb(im))

    def __getattr__(self, name: str) -> Any:
        if name == "transform":  # not set yet (unpickling): don't recurse
            raise AttributeError(name)
        return getattr(self.transform, name)

    def __repr__(self) -> str:
        return f"SafePreprocess(side={self.side}, {self.transform!r})"


def _decode(source, name: str, size: int) -> Image.Image:
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if size == 0:
        raise ImageError(name, "empty file (0 bytes)", kind="empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=list(FORMATS)) as im:
                check_shape(im.size, name)  # from the header, before decoding
                im.load()
                try:
                    upright = ImageOps.exif_transpose(im)
                except Exception:  # a damaged EXIF block: the pixels are still good, keep them as stored
                    upright = im
                rgb = to_rgb(upright if upright is not None else im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            name, f"refused: too many pixels, a possible decompression bomb ({e})", kind="too_large"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            name, f"not an image Pillow can read (formats read: {', '.join(FORMATS)})", kind="not_image"
        ) from None
    except (OSError, SyntaxError, ValueError, MemoryError) as e:
        raise ImageError(name, f"broken or truncated image ({e})", kind="broken") from None
    rgb.info[SOURCE_KEY] = name
    return rgb


def _to_8bit(im: Image.Image) -> Image.Image:
    """Greyscale 'L' from a 16/32-bit integer or float image, keeping its tones."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    finite = a[np.isfinite(a)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = float(finite.min()) if finite.size else 0.0
    if im.mode == "F" and bottom >= 0 and top <= 1:
        scale, low = 255.0, 0.0  # float images in [0, 1]
    elif bottom >= 0 and top <= 255:
        scale, low = 1.0, 0.0  # 8-bit values in a wide container
    elif bottom >= 0 and top <= 65535:
        scale, low = 255.0 / 65535.0, 0.0  # the usual 16-bit range: a 16-bit PNG or TIFF
    else:
        scale, low = 255.0 / max(top - bottom, 1e-12), bottom  # anything else: stretch what is there
    out = np.nan_to_num((a - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


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
