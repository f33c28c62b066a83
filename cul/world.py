"""The embedded world: procedurally drawn images of a coloured shape over a textured background.

Three kinds of concept (object = shape, colour, texture = style), eight of each. Some are
deliberately confusable neighbours (circle / ellipse / ring, square / diamond, red / orange / pink,
blue / purple / cyan, striped / checkered / grid), because keeping a forgotten concept's
neighbours is the hardest part of continual unlearning.

Captions come from several templates and synonyms; a few of each are held out of training so that
paraphrases of a concept can be probed later. Everything is deterministic by seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from cul.catalogue import Catalogue


class Kind(str, Enum):
    """The kind of a concept: which attribute of the image it controls."""

    OBJECT = "object"
    COLOUR = "colour"
    TEXTURE = "texture"


@dataclass(frozen=True)
class Concept:
    """One nameable thing the model can draw, with the words that may name it."""

    name: str
    kind: Kind
    synonyms: tuple[str, ...]  # used in training captions (the name first)
    held_out: tuple[str, ...]  # never seen in training: paraphrase probes
    descriptions: tuple[str, ...] = ()  # the concept without its name: description probes

    @property
    def words(self) -> tuple[str, ...]:
        return self.synonyms + self.held_out


CATALOGUE = Catalogue.load("world")  # catalogues/world.yaml: names, synonyms, neighbours, templates


def _concepts(kind: Kind) -> tuple[Concept, ...]:
    return tuple(
        Concept(c.name, kind, (c.name, *c.synonyms), tuple(c.paraphrases), tuple(c.descriptions))
        for c in CATALOGUE.of(kind.value)
    )


OBJECTS: tuple[Concept, ...] = _concepts(Kind.OBJECT)
COLOURS: tuple[Concept, ...] = _concepts(Kind.COLOUR)
TEXTURES: tuple[Concept, ...] = _concepts(Kind.TEXTURE)

CONCEPTS: dict[Kind, tuple[Concept, ...]] = {
    Kind.OBJECT: OBJECTS,
    Kind.COLOUR: COLOURS,
    Kind.TEXTURE: TEXTURES,
}

# RGB in [0, 1] of each colour concept. Saturated so they stand out from the grey textured background.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.08, 0.08),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.98, 0.90, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.05, 0.85, 0.90),
    "blue": (0.10, 0.20, 0.95),
    "purple": (0.55, 0.10, 0.80),
    "pink": (1.00, 0.45, 0.75),
}

# Confusable neighbours by design. Used to pick retain prompts and RA-N.
CONFUSABLES: dict[str, tuple[str, ...]] = {c.name: tuple(c.neighbours) for c in CATALOGUE.concepts}

# Caption templates; slots are the categories {object}, {colour}, {texture}.
TRAIN_TEMPLATES: tuple[str, ...] = tuple(CATALOGUE.templates["train"])
HELD_OUT_TEMPLATES: tuple[str, ...] = tuple(CATALOGUE.templates["held_out"])
# Partial captions teach the model each concept's marginal ("a red thing", "a circle"):
# object + colour, object + texture, colour + texture.
PARTIAL_TEMPLATES: tuple[str, ...] = tuple(CATALOGUE.templates["partial"])

CANONICAL_TEMPLATE = TRAIN_TEMPLATES[0]


def concept(name: str) -> Concept:
    """Look a concept up by its name (not a synonym); KeyError with the known names otherwise."""
    for group in CONCEPTS.values():
        for c in group:
            if c.name == name:
                return c
    known = ", ".join(c.name for g in CONCEPTS.values() for c in g)
    raise KeyError(f"unknown concept {name!r}; known concepts: {known}")


def resolve(word: str) -> Concept | None:
    """The concept a word names (its name, a training synonym or a held-out one), or None."""
    w = " ".join(word.lower().split())
    for group in CONCEPTS.values():
        for c in group:
            if w in c.words:
                return c
    return None


def _article(phrase: str) -> str:
    return phrase.replace(" a a", " an a").replace(" a e", " an e").replace(" a o", " an o")


def fill(template: str, o: str = "", c: str = "", t: str = "") -> str:
    """Fill a caption template, fixing 'a' / 'an' before vowels."""
    text = template.format(object=o, colour=c, texture=t)
    text = _article(" " + text).strip()
    if text.startswith("a ") and text[2:3] in "aeiou":
        text = "an " + text[2:]
    return text


def caption(o: str, c: str, t: str, template: str = CANONICAL_TEMPLATE) -> str:
    """The caption of one (object, colour, texture) triple with concept names."""
    return fill(template, o=o, c=c, t=t)


@dataclass(frozen=True)
class Scene:
    """What one image shows: names of its object, colour and texture."""

    object: str
    colour: str
    texture: str

    def label(self) -> tuple[int, int, int]:
        return (
            [c.name for c in OBJECTS].index(self.object),
            [c.name for c in COLOURS].index(self.colour),
            [c.name for c in TEXTURES].index(self.texture),
        )


def all_scenes() -> list[Scene]:
    """Every object x colour x texture combination, in a fixed order."""
    return [Scene(o.name, c.name, t.name) for o in OBJECTS for c in COLOURS for t in TEXTURES]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey-level background pattern (size x size) in [0, 1] with a random phase."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    lo, hi = 0.22 + 0.06 * rng.random(), 0.70 + 0.08 * rng.random()
    ph = rng.integers(0, 8)
    if name == "plain":
        g = np.full((size, size), 0.45 + 0.1 * rng.random(), np.float32)
        return g
    if name == "striped":  # horizontal bands, period 6
        m = ((y + ph) // 3) % 2
    elif name == "checkered":  # 4 px squares
        m = (((y + ph) // 4) + ((x + ph) // 4)) % 2
    elif name == "grid":  # thin lines every 6 px
        m = (((y + ph) % 6) == 0) | (((x + ph) % 6) == 0)
        m = 1 - m.astype(np.float32)
    elif name == "dotted":  # 2x2 dots on a 6 px lattice
        m = 1 - ((((y + ph) % 6) < 2) & (((x + ph) % 6) < 2)).astype(np.float32)
    elif name == "diagonal":
        m = ((x + y + ph) // 3) % 2
    elif name == "speckled":
        m = (rng.random((size, size)) < 0.5).astype(np.float32)
    elif name == "gradient":
        d = rng.integers(0, 2)
        ramp = (y if d == 0 else x) / (size - 1)
        return (lo + (hi - lo) * ramp).astype(np.float32)
    else:
        raise KeyError(f"unknown texture {name!r}")
    return np.where(m > 0, hi, lo).astype(np.float32)


def _polygon_mask(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Inside test for a convex polygon: the point is on the same side of every edge."""
    sides = []
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        sides.append((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0))
    signs = np.stack(sides)
    return np.asarray((signs >= 0).all(0) | (signs <= 0).all(0))


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of a large shape with jittered centre, size and rotation."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    s = size / 32.0
    cx = size / 2 + rng.uniform(-2.5, 2.5) * s
    cy = size / 2 + rng.uniform(-2.5, 2.5) * s
    r = rng.uniform(9.5, 12.0) * s
    dx, dy = x - cx, y - cy
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "ellipse":
        a, b = r * 1.15, r * 0.55
        th = rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.3, 0.3)
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if name == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "square":
        h = r * 0.82
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if name == "triangle":
        pts = np.array([[cx, cy - r], [cx - r * 0.95, cy + r * 0.75], [cx + r * 0.95, cy + r * 0.75]])
        return _polygon_mask(x, y, pts)
    if name == "star":
        ang = np.arctan2(dy, dx) + np.pi / 2
        rad = np.sqrt(dx**2 + dy**2)
        # radius of a 5-pointed star boundary as a function of angle
        k = (ang % (2 * np.pi / 5)) / (2 * np.pi / 5)
        edge = r * (0.45 + 0.55 * np.abs(1 - 2 * k))
        return rad <= edge
    if name == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise KeyError(f"unknown object {name!r}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one scene: an HxWx3 float32 image in [0, 1]."""
    rng = rng if rng is not None else np.random.default_rng(0)
    bg = _texture(scene.texture, size, rng)
    img = np.repeat(bg[..., None], 3, axis=2)
    mask = _shape_mask(scene.object, size, rng)
    rgb = np.asarray(COLOUR_RGB[scene.colour], np.float32)
    rgb = np.clip(rgb + rng.uniform(-0.04, 0.04, 3), 0, 1)
    img[mask] = rgb
    return img


# --------------------------------------------------------------------------------------------
# Sampling scenes and captions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    image: np.ndarray  # HxWx3 in [0, 1]
    caption: str
    scene: Scene


class World:
    """A seeded stream of (image, caption, scene) examples and fixed evaluation sets."""

    def __init__(
        self,
        size: int = 32,
        seed: int = 0,
        partial_caption_prob: float = 0.15,
        empty_caption_prob: float = 0.1,
        held_out: bool = False,
        exclude: Iterable[str] = (),
    ) -> None:
        """`exclude`: concept names no scene of the stream shows (the world a model retrained
        without them sees: `cul retrain`); each kind keeps at least one concept. Without it the
        stream is the same as before the option existed."""
        if size < 16:
            raise ValueError(f"image size must be at least 16 px, got {size}")
        self.size = size
        self.seed = seed
        self.partial_caption_prob = partial_caption_prob
        self.empty_caption_prob = empty_caption_prob
        self.held_out = held_out
        self.exclude = tuple(sorted(set(exclude)))
        for name in self.exclude:
            concept(name)  # KeyError with the known names
        self._kept = [[c.name for c in group if c.name not in self.exclude] for group in (OBJECTS, COLOURS, TEXTURES)]
        for kind, kept in zip(("object", "colour", "texture"), self._kept, strict=True):
            if not kept:
                raise ValueError(f"excluding {', '.join(self.exclude)} leaves no {kind} to draw")

    def _words(self, c: Concept, rng: np.random.Generator) -> str:
        pool = c.held_out if self.held_out and c.held_out else c.synonyms
        return pool[rng.integers(len(pool))]

    def describe(self, scene: Scene, rng: np.random.Generator) -> str:
        """A caption for a scene: random template and synonyms (train or held-out pools)."""
        o = self._words(concept(scene.object), rng)
        c = self._words(concept(scene.colour), rng)
        t = self._words(concept(scene.texture), rng)
        u = rng.random()
        if not self.held_out and u < self.empty_caption_prob:
            return ""
        if not self.held_out and u < self.empty_caption_prob + self.partial_caption_prob:
            tmpl = PARTIAL_TEMPLATES[rng.integers(len(PARTIAL_TEMPLATES))]
        else:
            pool = HELD_OUT_TEMPLATES if self.held_out else TRAIN_TEMPLATES
            tmpl = pool[rng.integers(len(pool))]
        return fill(tmpl, o=o, c=c, t=t)

    def random_scene(self, rng: np.random.Generator) -> Scene:
        o, c, t = (kept[rng.integers(len(kept))] for kept in self._kept)
        return Scene(o, c, t)

    def batch(self, batch_size: int, index: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """Batch `index` of an endless stream; it depends only on (seed, index), so training resumes
        on exactly the data it would have seen."""
        rng = np.random.default_rng([self.seed, index])
        scenes = [self.random_scene(rng) for _ in range(batch_size)]
        images = np.stack([render(s, self.size, rng) for s in scenes])
        captions = [self.describe(s, rng) for s in scenes]
        return images, captions, scenes

    def render_all(self, scenes: Iterable[Scene], seed: int | None = None) -> np.ndarray:
        """Images of the given scenes, each with its own reproducible jitter."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return np.stack([render(s, self.size, rng) for s in scenes])


def vocabulary() -> dict[str, list[str]]:
    """Concept names per kind, for the CLI and reports."""
    return {k.value: [c.name for c in v] for k, v in CONCEPTS.items()}
