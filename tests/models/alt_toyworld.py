"""A second, independently written renderer of the toy world's specification.

It shares no drawing code with `retriever.models.toyworld`: shapes are rasterised here from
signed distances with 4x4 supersampling, with their own palette, sizes and background, as
someone re-implementing the world from its description would. A model that learned the world,
not the renderer, must still caption these.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 64
PALETTE = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (240, 210, 50),
    "purple": (130, 50, 160),
    "orange": (240, 130, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
CENTRES = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
RADII = {"small": 4.5, "large": 10.0}  # smaller small shapes than the project's renderer


def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    angle = np.arctan2(y, x) + np.pi / 2  # 0 at the top
    dist = np.hypot(x, y)
    if shape == "triangle":
        n, outer = 3, r * 1.2
        # distance to the edge of a regular polygon with circumradius `outer`, along `angle`
        sector = np.mod(angle, 2 * np.pi / n) - np.pi / n
        return dist * np.cos(sector) <= outer * np.cos(np.pi / n)
    # star: five points, inner radius 0.45 of the outer, edges straight between the points
    outer, inner = r * 1.3, r * 1.3 * 0.45
    sector = np.mod(angle, 2 * np.pi / 5)
    t = np.abs(sector - np.pi / 5) / (np.pi / 5)  # 1 at a point, 0 between points
    return dist <= inner + (outer - inner) * t**1.6


def render(size: str, colour: str, shape: str, position: str, rng: np.random.Generator) -> Image.Image:
    """One scene; flat grey background with faint noise."""
    grey = rng.uniform(90, 170)
    image = np.clip(rng.normal(grey, 2.0, (SIDE, SIDE, 3)), 0, 255)
    cx, cy = (c + rng.uniform(-2, 2) for c in CENTRES[position])
    sub = (np.arange(SIDE * 4) + 0.5) / 4
    xs, ys = np.meshgrid(sub - cx, sub - cy)
    coverage = _inside(shape, xs, ys, RADII[size]).reshape(SIDE, 4, SIDE, 4).mean(axis=(1, 3))[..., None]
    image = image * (1 - coverage) + np.array(PALETTE[colour]) * coverage
    return Image.fromarray(image.round().astype("uint8"), "RGB")


def sample(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs in the toy world's caption format."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = ("small", "large")[rng.integers(2)]
        colour = list(PALETTE)[rng.integers(len(PALETTE))]
        shape = ("circle", "square", "triangle", "star")[rng.integers(4)]
        position = list(CENTRES)[rng.integers(4)]
        out.append((render(size, colour, shape, position, rng), f"a {size} {colour} {shape} on the {position}"))
    return out
