"""The toy world: 64x64 images of one coloured shape on a noisy grey background.

Every image has a known caption, `a {size} {colour} {shape} on the {position}`, so
models trained on it can be scored exactly, offline, in seconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

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
_RADIUS = {"small": 6.0, "large": 11.0}


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


def all_scenes() -> list[Scene]:
    """All 256 distinct scenes, in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS)]


def all_captions() -> list[str]:
    """The 256 captions of the toy world, in the order of `all_scenes()`."""
    return [scene.caption for scene in all_scenes()]


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


def render(scene: Scene, seed: int | None = None) -> Image.Image:
    """Draw `scene` as a 64x64 RGB image; `seed` controls noise and jitter."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    grey = int(rng.integers(100, 156))
    background = rng.normal(grey, 18.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).clip(0, 255).astype("uint8")
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)

    cx, cy = POSITIONS[scene.position]
    cx += float(rng.uniform(-4, 4))
    cy += float(rng.uniform(-4, 4))
    r = _RADIUS[scene.size] * float(rng.uniform(0.85, 1.15))
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        angle = float(rng.uniform(-0.2, 0.2))
        draw.polygon(_polygon(scene.shape, cx, cy, r, angle), fill=colour)
    return image


def sample(n: int, seed: int = 0) -> Iterator[tuple[Image.Image, str]]:
    """Yield `n` (image, caption) pairs, reproducible for a given seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    for _ in range(n):
        scene = scenes[int(rng.integers(len(scenes)))]
        yield render(scene, seed=int(rng.integers(2**31))), scene.caption
