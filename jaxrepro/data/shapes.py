"""The embedded data set: procedurally drawn "cat" and "dog" stand-ins with object masks.

Why: the project must train, test and explain without downloading anything. This module
draws a two-class image set locally and serves it through a real TFDS builder
(`jaxrepro_shapes`, array_record, random access), the same path real data takes.

What is drawn (all geometry in resolution-free unit coordinates, so one scene can be
rendered at any size):

* class 0, "cat": an elliptical head with two pointed triangular ears on top;
* class 1, "dog": a rounded-rectangle head with two long, drooping elliptical ears at its
  sides.

Both classes share everything else, so none of it tells the classes apart: position,
scale (dogs are drawn at 0.92x so that both classes cover the same mean area, about 9.5%
of the image), rotation (up to +-0.6 rad), body and ear colours, shading, eyes and nose,
background (two-colour gradient, low-frequency blotches, stripes or checks, pixel noise)
and 1-5 clutter shapes (ellipses, triangles, boxes, bars) drawn behind the object. Only
the composition of body and ears carries the label, so the task is learnable but not
trivial. `mask` is 1 on the object (head and ears), 0 elsewhere.

Reproducibility: example `index` of seed `seed` is a pure function of (seed, index,
image_size). Its scene is drawn from `np.random.Generator(PCG64(SeedSequence([seed,
index, 0])))`, its pixel noise from stream 1; labels alternate (`index % 2`), so classes
are exactly balanced. Per-pixel arithmetic uses only correctly rounded IEEE 754
operations (+ - * /, sqrt, floor, min/max), so SIMD code paths of different CPUs cannot
change the pixels; sines and cosines are taken once per shape with Python's `math` (the
C library's, the one part IEEE 754 does not pin down) and never vectorised. The scene
parameters do not depend on the image size, so one scene can be drawn at any size.
Images are stored as PNG (lossless), masks as zlib-compressed raw bytes. The tests pin
the fingerprints of the "tiny" config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxrepro.data.images import encode_png

CLASS_NAMES = ("cat", "dog")
DEFAULT_SEED = 0
ID_PREFIX = "shapes-"
DOG_SCALE = 0.92


# ----------------------------------------------------------------------------- scene


@dataclasses.dataclass(frozen=True)
class Shape:
    """One filled primitive in unit coordinates (x right, y down, image = [0, 1]^2).

    kind: "ellipse" (half-axes a, b), "box" (half-sizes a, b, corner radius r) or
    "triangle" (vertices `points`, relative to the centre, before rotation).
    """

    kind: str
    cx: float
    cy: float
    a: float = 0.0
    b: float = 0.0
    r: float = 0.0
    angle: float = 0.0
    points: tuple[tuple[float, float], ...] = ()
    color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shade: float = 0.0  # linear shading strength across the shape
    shade_angle: float = 0.0  # direction of the shading

    def extent(self) -> float:
        """Radius of a circle around (cx, cy) that holds the whole shape."""
        if self.kind == "triangle":
            return max(math.sqrt(px * px + py * py) for px, py in self.points)
        return math.sqrt(self.a * self.a + self.b * self.b)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to render one example at any resolution."""

    label: int
    background: dict
    clutter: tuple[Shape, ...]
    object_parts: tuple[Shape, ...]  # drawn in order; their union is the mask
    details: tuple[Shape, ...]  # eyes and nose, drawn on top, inside the mask
    noise: float


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, stream])))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def _color(rng: np.random.Generator) -> tuple[float, float, float]:
    return (float(rng.random()), float(rng.random()), float(rng.random()))


def _luma(c: tuple[float, float, float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _rot(x: float, y: float, c: float, s: float) -> tuple[float, float]:
    """Rotate the local offset (x, y) by the angle with cosine c and sine s."""
    return (x * c - y * s, x * s + y * c)


def _clutter_shape(rng: np.random.Generator) -> Shape:
    kind = ("ellipse", "triangle", "box", "bar")[int(rng.integers(0, 4))]
    cx, cy = _u(rng, 0.0, 1.0), _u(rng, 0.0, 1.0)
    size = _u(rng, 0.03, 0.12)
    angle = _u(rng, -math.pi, math.pi)
    color = _color(rng)
    shade = _u(rng, 0.0, 0.3)
    if kind == "ellipse":
        return Shape(
            "ellipse",
            cx,
            cy,
            a=size,
            b=size * _u(rng, 0.4, 1.0),
            angle=angle,
            color=color,
            shade=shade,
        )
    if kind == "box":
        a, b = size, size * _u(rng, 0.4, 1.0)
        return Shape(
            "box",
            cx,
            cy,
            a=a,
            b=b,
            r=min(a, b) * _u(rng, 0.0, 0.6),
            angle=angle,
            color=color,
            shade=shade,
        )
    if kind == "bar":
        return Shape(
            "box",
            cx,
            cy,
            a=size * 1.8,
            b=size * _u(rng, 0.12, 0.25),
            r=0.0,
            angle=angle,
            color=color,
            shade=shade,
        )
    pts = tuple(
        (size * math.cos(t), size * math.sin(t))
        for t in (_u(rng, 0.0, 2.1), _u(rng, 2.1, 4.2), _u(rng, 4.2, 2 * math.pi))
    )
    return Shape("triangle", cx, cy, points=pts, angle=angle, color=color, shade=shade)


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of example `index`: a pure function of (seed, index)."""
    rng = _rng(seed, index, 0)
    label = index % 2

    c0, c1 = _color(rng), _color(rng)
    background = dict(
        c0=c0,
        c1=c1,
        angle=_u(rng, 0.0, 2 * math.pi),
        spread=_u(rng, 0.5, 1.2),
        blotch_grid=int(rng.integers(3, 8)),
        blotch_amp=_u(rng, 0.02, 0.15),
        texture=int(rng.integers(0, 3)),
        texture_amp=_u(rng, 0.02, 0.08),
        texture_period=_u(rng, 0.04, 0.15),
        texture_angle=_u(rng, 0.0, math.pi),
    )
    background["blotches"] = tuple(float(v) for v in rng.random(background["blotch_grid"] ** 2))
    background["tint"] = _color(rng)

    clutter = tuple(_clutter_shape(rng) for _ in range(int(rng.integers(1, 6))))

    cx, cy = _u(rng, 0.32, 0.68), _u(rng, 0.38, 0.66)
    scale = _u(rng, 0.13, 0.21)
    if label == 1:  # same mean object area for both classes, so size tells nothing
        scale *= DOG_SCALE
    theta = _u(rng, -0.6, 0.6)
    ct, st = math.cos(theta), math.sin(theta)
    body = _color(rng)
    # Keep the object visible against the background under it (same rule for both classes).
    t = _gradient_t(background, cx, cy)
    bg_center = tuple(c0[k] + (c1[k] - c0[k]) * t for k in range(3))
    if abs(_luma(body) - _luma(bg_center)) < 0.2:
        body = (
            tuple(0.45 * v for v in body)
            if _luma(bg_center) > 0.5
            else tuple(0.55 + 0.45 * v for v in body)
        )
    ear_factor = _u(rng, 0.55, 1.0)
    ear_color = tuple(v * ear_factor for v in body)
    shade, shade_angle = _u(rng, 0.0, 0.35), _u(rng, 0.0, 2 * math.pi)
    aspect = _u(rng, 0.78, 1.0)

    def place(lx: float, ly: float) -> tuple[float, float]:
        dx, dy = _rot(lx * scale, ly * scale, ct, st)
        return cx + dx, cy + dy

    parts: list[Shape] = []
    if label == 0:  # cat: ellipse head, two pointed ears on top
        a, b = 1.0, aspect
        for side in (-1.0, 1.0):
            inner = (side * _u(rng, 0.1, 0.25), -b * 0.75)
            outer = (side * _u(rng, 0.75, 0.9), -b * 0.35)
            tip = (side * _u(rng, 0.45, 0.8), -b - _u(rng, 0.45, 0.8))
            ex, ey = place(0.0, 0.0)
            pts = tuple(_rot(px * scale, py * scale, ct, st) for px, py in (inner, outer, tip))
            parts.append(
                Shape(
                    "triangle",
                    ex,
                    ey,
                    points=pts,
                    color=ear_color,
                    shade=shade,
                    shade_angle=shade_angle,
                )
            )
        parts.append(
            Shape(
                "ellipse",
                cx,
                cy,
                a=a * scale,
                b=b * scale,
                angle=theta,
                color=body,
                shade=shade,
                shade_angle=shade_angle,
            )
        )
    else:  # dog: rounded-box head, two long drooping ears at the sides
        hx, hy = 0.85, 0.85 * _u(rng, 0.85, 1.1)
        radius = _u(rng, 0.2, 0.55)
        for side in (-1.0, 1.0):
            ea, eb = _u(rng, 0.24, 0.34), _u(rng, 0.6, 0.85)
            tilt = side * _u(rng, 0.1, 0.5)
            ax, ay = side * hx * _u(rng, 0.9, 1.05), -hy * _u(rng, 0.7, 0.95)
            # Hang the ear's long axis from the anchor, swung outwards by `tilt`.
            lx, ly = ax + math.sin(tilt) * eb, ay + math.cos(tilt) * eb
            ex, ey = place(lx, ly)
            parts.append(
                Shape(
                    "ellipse",
                    ex,
                    ey,
                    a=ea * scale,
                    b=eb * scale,
                    angle=theta - tilt,
                    color=ear_color,
                    shade=shade,
                    shade_angle=shade_angle,
                )
            )
        parts.append(
            Shape(
                "box",
                cx,
                cy,
                a=hx * scale,
                b=hy * scale,
                r=radius * scale,
                angle=theta,
                color=body,
                shade=shade,
                shade_angle=shade_angle,
            )
        )

    dark = _u(rng, 0.02, 0.25)
    eye_color = (dark, dark * _u(rng, 0.8, 1.2), dark * _u(rng, 0.8, 1.2))
    eye_dx, eye_dy, eye_r = _u(rng, 0.25, 0.42), _u(rng, -0.3, 0.0), _u(rng, 0.07, 0.13)
    details = []
    for side in (-1.0, 1.0):
        ex, ey = place(side * eye_dx, eye_dy)
        details.append(
            Shape(
                "ellipse",
                ex,
                ey,
                a=eye_r * scale,
                b=eye_r * scale * 1.2,
                angle=theta,
                color=eye_color,
            )
        )
    nx, ny = place(0.0, _u(rng, 0.25, 0.45))
    details.append(
        Shape("ellipse", nx, ny, a=0.12 * scale, b=0.08 * scale, angle=theta, color=eye_color)
    )

    return Scene(
        label=label,
        background=background,
        clutter=clutter,
        object_parts=tuple(parts),
        details=tuple(details),
        noise=_u(rng, 0.0, 0.06),
    )


# ---------------------------------------------------------------------------- render


def _gradient_t(bg: dict, x, y):
    """Position along the background gradient (0..1) at unit coordinates (x, y)."""
    c, s = math.cos(bg["angle"]), math.sin(bg["angle"])
    t = ((x - 0.5) * c + (y - 0.5) * s) / bg["spread"] + 0.5
    return np.clip(t, 0.0, 1.0) if isinstance(t, np.ndarray) else min(max(t, 0.0), 1.0)


def _bilinear_grid(values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a g x g grid spanning [0, 1]^2 at the given coordinates."""
    g = values.shape[0]
    u, v = xs * (g - 1), ys * (g - 1)  # (1, W), (H, 1)
    j0 = np.minimum(np.floor(u).astype(np.int64), g - 2)
    i0 = np.minimum(np.floor(v).astype(np.int64), g - 2)
    fu, fv = u - j0, v - i0
    top = values[i0, j0] * (1.0 - fu) + values[i0, j0 + 1] * fu
    bottom = values[i0 + 1, j0] * (1.0 - fu) + values[i0 + 1, j0 + 1] * fu
    return top * (1.0 - fv) + bottom * fv


def _background(bg: dict, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    t = _gradient_t(bg, xs, ys)[..., None]  # (H, W, 1)
    c0, c1 = np.asarray(bg["c0"]), np.asarray(bg["c1"])
    img = c0 + (c1 - c0) * t
    g = bg["blotch_grid"]
    blotch = _bilinear_grid(np.asarray(bg["blotches"]).reshape(g, g) * 2.0 - 1.0, xs, ys)
    img = img + blotch[..., None] * (bg["blotch_amp"] * (0.5 + np.asarray(bg["tint"])))
    if bg["texture"]:
        p = bg["texture_period"]
        if bg["texture"] == 1:  # stripes
            c, s = math.cos(bg["texture_angle"]), math.sin(bg["texture_angle"])
            cell = np.floor((xs * c + ys * s) / p)
        else:  # checks
            cell = np.floor(xs / p) + np.floor(ys / p)
        parity = cell - 2.0 * np.floor(cell / 2.0)  # 0 or 1
        img = img + ((parity - 0.5) * bg["texture_amp"])[..., None]
    return img


def _signed_distance(shape: Shape, xs: np.ndarray, ys: np.ndarray):
    """Signed distance (unit coordinates, < 0 inside) and local coordinates of a shape."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = xs - shape.cx, ys - shape.cy
    u, v = dx * c + dy * s, dy * c - dx * s  # rotate by -angle
    if shape.kind == "ellipse":
        a2, b2 = shape.a * shape.a, shape.b * shape.b
        f = u * u / a2 + v * v / b2 - 1.0
        grad = 2.0 * np.sqrt(u * u / (a2 * a2) + v * v / (b2 * b2))
        return f / (grad + 1e-12), u, v
    if shape.kind == "box":
        qx = np.abs(u) - shape.a + shape.r
        qy = np.abs(v) - shape.b + shape.r
        ox, oy = np.maximum(qx, 0.0), np.maximum(qy, 0.0)
        return np.sqrt(ox * ox + oy * oy) + np.minimum(np.maximum(qx, qy), 0.0) - shape.r, u, v
    if shape.kind == "triangle":
        pts = shape.points
        area2 = (pts[1][0] - pts[0][0]) * (pts[2][1] - pts[0][1]) - (pts[1][1] - pts[0][1]) * (
            pts[2][0] - pts[0][0]
        )
        if area2 < 0:
            pts = (pts[0], pts[2], pts[1])
        d = None
        for k in range(3):
            (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % 3]
            ex, ey = x1 - x0, y1 - y0
            n = math.sqrt(ex * ex + ey * ey)
            # Outward normal of a counter-clockwise (in y-down axes) edge is (ey, -ex).
            dk = ((dx - x0) * ey - (dy - y0) * ex) / n
            d = dk if d is None else np.maximum(d, dk)
        return d, dx, dy
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def _window(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel rows/columns [i0, i1) x [j0, j1) that can be touched by the shape."""
    r = shape.extent()
    j0 = max(int(math.floor((shape.cx - r) * size)) - 2, 0)
    j1 = min(int(math.ceil((shape.cx + r) * size)) + 2, size)
    i0 = max(int(math.floor((shape.cy - r) * size)) - 2, 0)
    i1 = min(int(math.ceil((shape.cy + r) * size)) + 2, size)
    return i0, i1, j0, j1


def _paint(
    img: np.ndarray, shape: Shape, coords: np.ndarray, size: int, mask: np.ndarray | None = None
) -> None:
    """Composite a shape onto img in place (1-pixel anti-aliased edge); update mask."""
    i0, i1, j0, j1 = _window(shape, size)
    if i0 >= i1 or j0 >= j1:
        return
    xs, ys = coords[None, j0:j1], coords[i0:i1, None]
    d, u, v = _signed_distance(shape, xs, ys)
    alpha = np.clip(0.5 - d * size, 0.0, 1.0)
    color = np.asarray(shape.color)
    if shape.shade:
        extent = shape.extent()
        c, s = math.cos(shape.shade_angle), math.sin(shape.shade_angle)
        light = 1.0 + shape.shade * (u * c + v * s) / extent
        color = np.clip(color * light[..., None], 0.0, 1.0)
    patch = img[i0:i1, j0:j1]
    patch += alpha[..., None] * (color - patch)
    if mask is not None:
        mask[i0:i1, j0:j1] |= alpha >= 0.5


def render(
    scene: Scene, image_size: int, noise_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene: uint8 image [S, S, 3] and uint8 object mask [S, S]."""
    size = int(image_size)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres
    img = _background(scene.background, coords[None, :], coords[:, None])
    for shape in scene.clutter:
        _paint(img, shape, coords, size)
    mask = np.zeros((size, size), dtype=bool)
    for shape in scene.object_parts:
        _paint(img, shape, coords, size, mask)
    for shape in scene.details:
        _paint(img, shape, coords, size)
    if scene.noise:
        img += (noise_rng.random((size, size, 3)) * 2.0 - 1.0) * scene.noise
    pixels = np.clip(np.floor(img * 255.0 + 0.5), 0.0, 255.0).astype(np.uint8)
    return pixels, mask.astype(np.uint8)


def example_id(index: int) -> str:
    """The id of example `index` (the same at every image size)."""
    return f"{ID_PREFIX}{index:06d}"


def render_example(seed: int, index: int, image_size: int) -> dict:
    """Example `index` as numpy: image uint8 [S,S,3], mask uint8 [S,S], label, id."""
    scene = sample_scene(seed, index)
    image, mask = render(scene, image_size, _rng(seed, index, 1))
    return {"image": image, "mask": mask, "label": scene.label, "id": example_id(index)}


# --------------------------------------------------------------------------- builder


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """A shapes variant: image size, number of examples and generator seed."""

    image_size: int = 180
    num_examples: int = 3000
    seed: int = DEFAULT_SEED


BUILDER_CONFIGS = (
    ShapesConfig(
        name="default",
        image_size=180,
        num_examples=3000,
        description="3,000 images at 180x180 (the paper's 2,000 train + 1,000 validation).",
    ),
    ShapesConfig(
        name="tiny", image_size=32, num_examples=96, description="96 images at 32x32, for tests."
    ),
)


def config_for(image_size: int, num_examples: int) -> ShapesConfig:
    """The named config of that size holding enough examples, else a custom one.

    A custom config is named `s<size>_n<count>`. Its count is the smallest named
    config's count that suffices (96, then 3,000), else num_examples rounded up to even,
    so a custom config holds the same scenes (same ids, same split) as "tiny" or
    "default", drawn at another size.
    """
    for config in BUILDER_CONFIGS:
        if config.image_size == image_size and config.num_examples >= num_examples:
            return config
    counts = sorted(c.num_examples for c in BUILDER_CONFIGS)
    count = next((c for c in counts if c >= num_examples), int(num_examples) + num_examples % 2)
    return ShapesConfig(
        name=f"s{image_size}_n{count}",
        image_size=int(image_size),
        num_examples=count,
        description=f"{count} images at {image_size}x{image_size}.",
    )


def _encoded_example(seed: int, index: int, image_size: int) -> tuple[str, dict]:
    ex = render_example(seed, index, image_size)
    return ex["id"], {
        "image": encode_png(ex["image"]),
        "mask": ex["mask"],
        "label": ex["label"],
        "id": ex["id"],
    }


class JaxreproShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the embedded shapes set (generated locally, no download)."""

    name = "jaxrepro_shapes"
    # Bump on any change to the drawn pixels (tests/test_data.py pins the tiny set's
    # fingerprints), so that stale prepared data is never reused.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding="zlib"),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for index in range(cfg.num_examples):
            yield _encoded_example(cfg.seed, index, cfg.image_size)
