"""The toy world: 64x64 images of one coloured shape on a grey background.

Every image has a known caption, `a {size} {colour} {shape} on the {position}`, so
models trained on it can be scored exactly, offline, in seconds.

A `Style` says how a scene is drawn (background noise and grey level, shape scale, rotation,
position jitter, antialiasing, JPEG compression). `render` draws the classic look by default;
`random_style` gives the variety the v2 toy models are trained on, and `HELD_OUT_STYLES` are
looks no training run draws, for measuring whether a model learned the world or the renderer
(`STRESS_STYLES` are harsher still, reported without a target).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SIZE = 64
SIZES = ("small", "large")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
# The same world in Chinese (`toyworld-zh`): captions are `{position}有一个{size}的{colour}{shape}`.
ZH = {
    "small": "小",
    "large": "大",
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "white": "白色",
    "black": "黑色",
    "orange": "橙色",
    "purple": "紫色",
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "五角星",
    "left": "左边",
    "right": "右边",
    "top": "上方",
    "bottom": "下方",
}
LANGS = ("en", "zh")
_RADIUS = {"small": 6.0, "large": 11.0}
# Radius multipliers a v2 training style may draw, per size class: they never overlap, so size
# stays well defined, and reach down to the smallest shapes a reviewer drew (about 4 px).
TRAIN_SCALES = {"small": (0.64, 1.25), "large": (0.86, 1.27)}


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. The defaults are the classic (v1) look."""

    grey: tuple[int, int] = (100, 156)  # background grey level, drawn uniformly in [lo, hi)
    noise: float = 18.0  # std of the per-pixel background noise
    # Radius multiplier range, for every size or per size ({"small": ..., "large": ...}); None: TRAIN_SCALES.
    scale: tuple[float, float] | dict[str, tuple[float, float]] | None = (0.85, 1.15)
    rotation: float = 0.2  # max rotation of polygons, radians
    jitter: float = 4.0  # max position offset, pixels
    colour_jitter: int = 20
    antialias: bool = False
    jpeg_quality: int | None = None


def random_style(rng) -> Style:
    """A training style: noise from none-ish to heavy, any grey, scale jitter across the size
    class, rotations, jitter, antialiasing on or off, sometimes JPEG. Held-out styles lie outside
    it: a background noise below 3 and JPEG quality below 30 are never drawn."""
    return Style(
        grey=(int(rng.integers(60, 190)),) * 2,
        noise=float(rng.choice([rng.uniform(3, 8), rng.uniform(8, 40)])),
        scale=None,
        rotation=0.6,
        jitter=6.0,
        colour_jitter=30,
        antialias=bool(rng.random() < 0.5),
        jpeg_quality=int(rng.integers(30, 95)) if rng.random() < 0.3 else None,
    )


HELD_OUT_STYLES = {
    # A plain, flat background and the smallest small shapes (about 4 px, as a reviewer drew
    # them) beside ordinary large ones: the look that fooled v1 (0.97 -> 0.67). Shrinking the
    # large shapes by the same factor would make them as big as training's small ones, a size
    # no model could call.
    "plain-smallest": Style(
        grey=(110, 150),
        noise=0.0,
        scale={"small": (0.68, 0.78), "large": (0.86, 1.0)},
        rotation=0.0,
        jitter=3.0,
        colour_jitter=0,
        antialias=True,
    ),
    # Classic v1 rendering, antialiased, on a flat background.
    "flat-classic": Style(grey=(100, 156), noise=0.0, antialias=True),
}

# Looks reported but not held to the held-out targets: heavy noise under harsher JPEG than
# training applies. JPEG's 4:2:0 chroma subsampling at quality 22 smears a 4-pixel star, square
# or circle of one colour into the same blob, so the shape of small objects is not in the pixels.
STRESS_STYLES = {
    "noisy-jpeg": Style(grey=(90, 170), noise=25.0, scale=None, rotation=0.3, jitter=5.0, jpeg_quality=22),
}


@dataclass(frozen=True)
class Scene:
    """One toy-world scene; its caption is fully determined by the four attributes."""

    size: str
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on the {self.position}"

    @property
    def caption_zh(self) -> str:
        """The Chinese caption, e.g. 左边有一个大的红色五角星."""
        return f"{ZH[self.position]}有一个{ZH[self.size]}的{ZH[self.colour]}{ZH[self.shape]}"

    def caption_in(self, lang: str = "en") -> str:
        """The caption in `lang` (`en` or `zh`)."""
        if lang not in LANGS:
            raise ValueError(f"unknown toy-world language {lang!r}; use one of {', '.join(LANGS)}")
        return self.caption_zh if lang == "zh" else self.caption


def all_scenes() -> list[Scene]:
    """All 256 distinct scenes, in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS)]


def all_captions(lang: str = "en") -> list[str]:
    """The 256 captions of the toy world in `lang`, in the order of `all_scenes()`."""
    return [scene.caption_in(lang) for scene in all_scenes()]


# Partial captions: each names some of a scene's attributes. The v2 toy CLIP is trained on them
# too, so single attributes ("blue", "a star") are meaningful texts for steering and for label
# tables. Within one template the texts are mutually exclusive, which is what training needs.
PARTIAL_TEMPLATES = (
    "{colour}",
    "a {colour} shape",
    "{shape}",
    "a {shape}",
    "{size}",
    "a {size} shape",
    "on the {position}",
    "a {size} {shape}",
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {shape} on the {position}",
)


def partial_caption(template: str, scene: Scene) -> str:
    """`template` filled in with `scene`'s attributes."""
    return template.format(size=scene.size, colour=scene.colour, shape=scene.shape, position=scene.position)


def partial_captions(template: str) -> list[str]:
    """Every distinct text of one partial template, in a fixed order."""
    return list(dict.fromkeys(partial_caption(template, scene) for scene in all_scenes()))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r * 1.15] * 4  # a square of half-side ~0.8 r looks as big as a circle of radius r
    elif shape == "triangle":
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r * 1.25] * 3
    elif shape == "star":
        corners = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r * 1.3 if k % 2 == 0 else r * 0.55 for k in range(10)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)) for a, rad in zip(corners, radii)]


def render(scene: Scene, seed: int | None = None, style: Style | None = None) -> Image.Image:
    """Draw `scene` as a 64x64 RGB image; `seed` controls noise and jitter, `style` the look."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    style = style or Style()
    rng = np.random.default_rng(seed)
    lo, hi = style.grey
    grey = int(rng.integers(lo, hi)) if hi > lo else lo
    if style.noise > 0:
        background = rng.normal(grey, style.noise, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).clip(0, 255).astype("uint8")
    else:
        background = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), grey, dtype="uint8")
    cx, cy = map(float, POSITIONS[scene.position])
    cx += float(rng.uniform(-style.jitter, style.jitter))
    cy += float(rng.uniform(-style.jitter, style.jitter))
    scales = style.scale or TRAIN_SCALES
    scale_lo, scale_hi = scales[scene.size] if isinstance(scales, dict) else scales
    r = _RADIUS[scene.size] * float(rng.uniform(scale_lo, scale_hi))
    j = style.colour_jitter
    colour = tuple(int(np.clip(c + rng.integers(-j, j + 1), 0, 255)) for c in COLOURS[scene.colour])
    angle = float(rng.uniform(-style.rotation, style.rotation))
    # Antialiasing: draw a 4x mask and let resizing average it; the background stays sharp.
    k = 4 if style.antialias else 1
    mask = Image.new("L", (IMAGE_SIZE * k, IMAGE_SIZE * k), 0)
    draw = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        draw.polygon([(x * k, y * k) for x, y in _polygon(scene.shape, cx, cy, r, angle)], fill=255)
    if k > 1:
        mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    image = Image.composite(Image.new("RGB", mask.size, colour), Image.fromarray(background, "RGB"), mask)
    if style.jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=style.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def sample(
    n: int, seed: int = 0, style: Style | str | None = None, lang: str = "en"
) -> Iterator[tuple[Image.Image, str]]:
    """Yield `n` (image, caption) pairs, reproducible for a given seed (the same images in every `lang`).

    `style`: a Style, a name from HELD_OUT_STYLES or STRESS_STYLES, "random" (a fresh training style per image),
    or None for the classic look.
    """
    import numpy as np

    if isinstance(style, str) and style != "random":
        style = {**HELD_OUT_STYLES, **STRESS_STYLES}[style]
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    for _ in range(n):
        scene = scenes[int(rng.integers(len(scenes)))]
        image_seed = int(rng.integers(2**31))
        look = random_style(np.random.default_rng(image_seed + 1)) if isinstance(style, str) else style  # "random"
        yield render(scene, seed=image_seed, style=look), scene.caption_in(lang)
