"""The toy world's scene grammar: attributes, scenes, captions, the held-out split and the toy prompt expander.

A scene is one object (optionally two) with a shape, a colour and a motion, on a plain background, seen for
`num_frames` frames at `size` x `size` pixels. Captions come from the grammar; 20% of the colour x shape x motion
combinations never appear in training captions, so evaluating on them measures compositional generalisation.

`expand_caption` stands in for a language-model prompt expander: it rewrites a caption with synonyms and another
word order, deterministically from a seed, and `parse_caption` reads every rewrite back to the same attributes.

Coordinates are in pixels with the frame spanning [0, size]; pixel (row i, column j) has its centre at
(x, y) = (j + 0.5, i + 0.5), and y grows downward, so "up" means decreasing y.

Standard library only: the renderer (torch) and the analyzer (numpy) build on this module.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Saturated colours chosen so that every pair differs by >= 110/255 in RGB distance and every colour differs from
# every background by >= 136/255 (tests check both), which keeps the analyzer's palette vote unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (30, 205, 50),
    "blue": (40, 90, 255),
    "yellow": (245, 235, 40),
    "purple": (170, 50, 235),
    "orange": (255, 130, 0),
    "white": (245, 245, 245),
    "cyan": (30, 225, 235),
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Dark, muted backgrounds so every object colour stands out; their names never double as object colours, which
# lets the caption parser find the background by its colour word alone.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (88, 88, 88),
    "black": (10, 10, 10),
    "navy": (15, 20, 80),
    "brown": (90, 50, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

NUM_FRAMES = 17
FRAME_SIZE = 32
SPEED_PX_PER_FRAME = 0.75  # 12 px over 17 frames: clearly visible, yet a 5 px object never leaves a 32 px frame.
MIN_HALF_SIZE, MAX_HALF_SIZE = 3.5, 5.0  # half-extent: an object covers roughly 4-8% of a 32x32 frame
EDGE_MARGIN_PX = 1.0  # gap kept between an object's extent and the frame edge on every frame

# Unit velocity per motion, in (x, y) with y growing downward.
MOTION_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}

Split = Literal["train", "heldout", "all"]
Combo = tuple[str, str, str]  # (colour, shape, motion)


@dataclass(frozen=True)
class ToyObject:
    """One object: its attributes, its centre at frame 0 (pixels) and its half-extent (pixels)."""

    shape: str
    colour: str
    motion: str
    x0: float
    y0: float
    size: float

    def velocity(self) -> tuple[float, float]:
        """Velocity in pixels per frame, (vx, vy)."""
        dx, dy = MOTION_DIRECTIONS[self.motion]
        return dx * SPEED_PX_PER_FRAME, dy * SPEED_PX_PER_FRAME

    def centre_at(self, frame: int) -> tuple[float, float]:
        """Centre (x, y) at a frame index."""
        vx, vy = self.velocity()
        return self.x0 + vx * frame, self.y0 + vy * frame


@dataclass(frozen=True)
class Scene:
    """Objects drawn in order (later over earlier) on a named background."""

    objects: tuple[ToyObject, ...]
    background: str

    def to_dict(self) -> dict:
        """A JSON-friendly dict; `Scene.from_dict` inverts it."""
        return {"objects": [asdict(obj) for obj in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Rebuild a scene written by `to_dict`."""
        objects = tuple(ToyObject(**obj) for obj in data["objects"])
        return cls(objects=objects, background=data["background"])


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: (colour, shape, motion) per object, in caption order, and the background."""

    objects: tuple[Combo, ...]
    background: str


# ---------------------------------------------------------------------------------------------------------------
# Held-out combinations
# ---------------------------------------------------------------------------------------------------------------


def _held_out_combos() -> frozenset[Combo]:
    """Hold out one motion per (colour, shape) pair: 8 * 4 = 32 combos, exactly 20% of 160.

    The motion index is (3 * colour_index + 2 * shape_index + 1) mod 5, plain arithmetic so the split never
    depends on a random-number implementation. Because 2 is invertible mod 5, the four shapes of one colour hold
    out four different motions, so each (colour, motion) pair keeps three shapes in training; because 3 is
    invertible mod 5, each (shape, motion) pair loses at most 2 of its 8 colours. Every value and every pair of
    values is therefore still seen in training; only the triple is new.
    """
    held = set()
    for colour_index, colour in enumerate(COLOUR_NAMES):
        for shape_index, shape in enumerate(SHAPES):
            motion = MOTIONS[(3 * colour_index + 2 * shape_index + 1) % len(MOTIONS)]
            held.add((colour, shape, motion))
    return frozenset(held)


ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(COLOUR_NAMES, SHAPES, MOTIONS))
HELD_OUT_COMBOS: frozenset[Combo] = _held_out_combos()
TRAIN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS)
HELDOUT_COMBOS_SORTED: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c in HELD_OUT_COMBOS)


def combo_of(obj: ToyObject) -> Combo:
    """The (colour, shape, motion) triple of an object."""
    return (obj.colour, obj.shape, obj.motion)


def split_of(scene: Scene | CaptionSpec) -> Literal["train", "heldout"]:
    """"heldout" when any object's combination is held out of training, else "train"."""
    if isinstance(scene, CaptionSpec):
        combos = scene.objects
    else:
        combos = tuple(combo_of(obj) for obj in scene.objects)
    return "heldout" if any(c in HELD_OUT_COMBOS for c in combos) else "train"


def combos_of_split(split: Split) -> tuple[Combo, ...]:
    """The combinations a split samples from."""
    if split == "train":
        return TRAIN_COMBOS
    if split == "heldout":
        return HELDOUT_COMBOS_SORTED
    if split == "all":
        return ALL_COMBOS
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------------------------


def start_range(motion: str, half: float, *, num_frames: int, size: int) -> tuple[tuple[float, float], ...]:
    """Allowed (low, high) for x0 and for y0 so the object stays inside the frame on every frame."""
    dx, dy = MOTION_DIRECTIONS[motion]
    ranges = []
    for direction in (dx, dy):
        travel = direction * SPEED_PX_PER_FRAME * (num_frames - 1)
        low = EDGE_MARGIN_PX + half - min(0.0, travel)
        high = size - EDGE_MARGIN_PX - half - max(0.0, travel)
        if low > high:
            raise ValueError(f"a {size}px frame cannot hold a {half}px object moving {motion} for {num_frames} frames")
        ranges.append((low, high))
    return tuple(ranges)


def _sample_object(rng: random.Random, combo: Combo, *, num_frames: int, size: int) -> ToyObject:
    """Place one object with the given attributes uniformly among positions that keep it inside the frame."""
    colour, shape, motion = combo
    half = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE)
    (x_low, x_high), (y_low, y_high) = start_range(motion, half, num_frames=num_frames, size=size)
    return ToyObject(shape=shape, colour=colour, motion=motion, x0=rng.uniform(x_low, x_high),
                     y0=rng.uniform(y_low, y_high), size=half)


def _overlap_free(a: ToyObject, b: ToyObject, num_frames: int) -> bool:
    """True when the two objects' centres stay at least their summed half-extents apart on every frame."""
    for frame in range(num_frames):
        (ax, ay), (bx, by) = a.centre_at(frame), b.centre_at(frame)
        if max(abs(ax - bx), abs(ay - by)) < a.size + b.size:
            return False
    return True


def _pick_combos(rng: random.Random, split: Split, num_objects: int) -> tuple[Combo, ...]:
    """Combinations for one scene; a held-out scene needs only one held-out object, the other may be any."""
    if num_objects == 1:
        return (rng.choice(combos_of_split(split)),)
    if split == "heldout":
        combos = [rng.choice(HELDOUT_COMBOS_SORTED), rng.choice(ALL_COMBOS)]
        rng.shuffle(combos)
        return tuple(combos)
    return tuple(rng.choice(combos_of_split(split)) for _ in range(num_objects))


def _sample_scene(rng: random.Random, split: Split, two_object_prob: float, num_frames: int, size: int) -> Scene:
    """One scene; two-object scenes are re-drawn until their objects never overlap."""
    background = rng.choice(BACKGROUND_NAMES)
    num_objects = 2 if rng.random() < two_object_prob else 1
    for _ in range(1000):
        combos = _pick_combos(rng, split, num_objects)
        objects = tuple(_sample_object(rng, c, num_frames=num_frames, size=size) for c in combos)
        if num_objects == 1 or _overlap_free(objects[0], objects[1], num_frames):
            return Scene(objects=objects, background=background)
    raise ValueError(f"could not place two non-overlapping objects in a {size}px frame")  # pragma: no cover


def sample_scenes(n: int, *, seed: int, split: Split = "train", two_object_prob: float = 0.0,
                  num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> list[Scene]:
    """`n` scenes drawn deterministically from `seed`, every object fully inside the frame on every frame."""
    combos_of_split(split)  # validate early
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    rng = random.Random(seed)
    return [_sample_scene(rng, split, two_object_prob, num_frames, size) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------

_CANONICAL_MOTION = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "standing still",
}


def _article(next_word: str) -> str:
    """'an' before a vowel sound, else 'a'."""
    return "an" if next_word[:1] in "aeiou" else "a"


def _canonical_object(combo: Combo) -> str:
    colour, shape, motion = combo
    return f"{_article(colour)} {colour} {shape} {_CANONICAL_MOTION[motion]}"


def caption_of_spec(spec: CaptionSpec) -> str:
    """The canonical caption of a spec, e.g. 'a red circle moving left on a gray background'."""
    objects = " and ".join(_canonical_object(c) for c in spec.objects)
    return f"{objects} on {_article(spec.background)} {spec.background} background"


def spec_of(scene: Scene) -> CaptionSpec:
    """The attributes a scene's caption names."""
    return CaptionSpec(objects=tuple(combo_of(obj) for obj in scene.objects), background=scene.background)


def caption(scene: Scene) -> str:
    """Canonical English caption of a scene; two objects are joined by ' and '."""
    return caption_of_spec(spec_of(scene))


def all_captions(split: Split = "all") -> list[str]:
    """Every single-object canonical caption of a split: its combinations times the 4 backgrounds."""
    return [caption_of_spec(CaptionSpec(objects=(combo,), background=bg))
            for combo in combos_of_split(split) for bg in BACKGROUND_NAMES]


# ---------------------------------------------------------------------------------------------------------------
# Toy expander and parser. The parser reads keywords, so every synonym below maps back through _KEYWORDS.
# ---------------------------------------------------------------------------------------------------------------

_COLOUR_ADJECTIVES = ("", "bright ", "vivid ")
_COLOUR_SYNONYMS = {name: (name,) for name in COLOUR_NAMES} | {"purple": ("purple", "violet")}
_SHAPE_SYNONYMS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle shape"),
    "cross": ("cross", "plus sign"),
}
# Participle phrases ("a red circle drifting to the left") and clause forms ("a red circle drifts to the left").
_MOTION_PARTICIPLES = {
    "left": ("moving left", "drifting to the left", "sliding leftward", "heading left", "travelling to the left"),
    "right": ("moving right", "drifting to the right", "sliding rightward", "heading right", "travelling to the right"),
    "up": ("moving up", "rising", "floating upward", "drifting upwards", "climbing"),
    "down": ("moving down", "falling", "sinking", "drifting downward", "descending"),
    "still": ("standing still", "staying still", "resting motionless", "holding still", "sitting stationary"),
}
_MOTION_CLAUSES = {
    "left": ("moves left", "drifts to the left", "slides leftward", "heads left"),
    "right": ("moves right", "drifts to the right", "slides rightward", "heads right"),
    "up": ("moves up", "rises", "floats upward", "climbs"),
    "down": ("moves down", "falls", "sinks", "descends"),
    "still": ("stands still", "stays still", "rests motionless", "holds still"),
}
_BACKGROUND_SYNONYMS = {name: (name,) for name in BACKGROUND_NAMES} | {"gray": ("gray", "grey"),
                                                                      "navy": ("navy", "dark navy")}
# {objects} is a list of participle phrases, {clauses} a list of clauses; {bg} a background colour word.
_TEMPLATES = (
    "{objects} on {bg_article} {bg} background",
    "{objects}, on {bg_article} {bg} background",
    "on {bg_article} {bg} background, {objects}",
    "{objects} against {bg_article} {bg} backdrop",
    "{bg_article} {bg} background with {objects}",
    "{clauses} on {bg_article} {bg} background",
    "on {bg_article} {bg} backdrop, {clauses}",
    "against {bg_article} {bg} background, {clauses}",
)
_OBJECT_ORDERS = ("{art} {adj}{colour} {shape}", "{art} {shape} in {adj}{colour}")

_MOTION_KEYWORDS = {
    "left": ("left", "leftward", "leftwards"),
    "right": ("right", "rightward", "rightwards"),
    "up": ("up", "upward", "upwards", "rising", "rises", "climbing", "climbs"),
    "down": ("down", "downward", "downwards", "falling", "falls", "sinking", "sinks", "descending", "descends"),
    "still": ("still", "motionless", "stationary"),
}
_SHAPE_KEYWORDS = {"circle": ("circle", "disc", "ball"), "square": ("square", "box", "block"),
                   "triangle": ("triangle",), "cross": ("cross", "plus")}
_BACKGROUND_NOUNS = ("background", "backdrop")


def _keyword_table() -> dict[str, tuple[str, str]]:
    """Word -> (attribute kind, value) for every word the parser recognises."""
    table: dict[str, tuple[str, str]] = {}
    for kind, groups in (("colour", _COLOUR_SYNONYMS), ("shape", _SHAPE_KEYWORDS), ("motion", _MOTION_KEYWORDS)):
        for value, words in groups.items():
            table.update({w: (kind, value) for w in words})
    for value, phrases in _BACKGROUND_SYNONYMS.items():
        table.update({p.split()[-1]: ("background", value) for p in phrases})
    return table


_KEYWORDS = _keyword_table()
_TOKEN_RE = re.compile(r"[a-z]+|,")


def tokenize(text: str) -> list[str]:
    """Lowercase words and commas; any other character separates tokens."""
    return _TOKEN_RE.findall(text.lower())


def _object_phrase(rng: random.Random, combo: Combo, clause: bool) -> str:
    """One object rewritten with synonyms, in one of two word orders."""
    colour, shape, motion = combo
    adj = rng.choice(_COLOUR_ADJECTIVES)
    colour_word = rng.choice(_COLOUR_SYNONYMS[colour])
    shape_word = rng.choice(_SHAPE_SYNONYMS[shape])
    order = rng.choice(_OBJECT_ORDERS)
    first = (adj or colour_word) if order.startswith("{art} {adj}") else shape_word
    noun = order.format(art=_article(first), adj=adj, colour=colour_word, shape=shape_word)
    motion_phrase = rng.choice((_MOTION_CLAUSES if clause else _MOTION_PARTICIPLES)[motion])
    return f"{noun} {motion_phrase}"


def expand_spec(spec: CaptionSpec, rng: random.Random) -> str:
    """A rewrite of a spec's caption: synonyms, adjectives and word order drawn from `rng`."""
    template = rng.choice(_TEMPLATES)
    clause = "{clauses}" in template
    objects = " and ".join(_object_phrase(rng, combo, clause) for combo in spec.objects)
    bg = rng.choice(_BACKGROUND_SYNONYMS[spec.background])
    return template.format(objects=objects, clauses=objects, bg=bg, bg_article=_article(bg))


def expand_caption(text: str, seed: int) -> str:
    """Rewrite a toy caption deterministically in (text, seed); `parse_caption` reads it back unchanged."""
    spec = parse_caption(text)
    # A string seed is hashed with SHA-512 by `random`, so the result is stable across processes and platforms.
    rng = random.Random(f"toy-expander:{seed}:{' '.join(tokenize(text))}")
    return expand_spec(spec, rng)


def _parse_segment(tokens: Sequence[str]) -> Combo | None:
    """(colour, shape, motion) named in one ' and '-separated segment; None when it names no object attribute."""
    found: dict[str, set[str]] = {"colour": set(), "shape": set(), "motion": set()}
    counts = {"colour": 0, "shape": 0}
    for token in tokens:
        kind, value = _KEYWORDS.get(token, ("", ""))
        if kind in found:
            found[kind].add(value)
            counts[kind] = counts.get(kind, 0) + 1
    if not any(found.values()):
        return None
    if counts["colour"] != 1 or counts["shape"] != 1 or len(found["motion"]) != 1:
        raise ValueError(f"not a toy caption: {' '.join(tokens)!r} does not name exactly one colour, shape and motion")
    return (found["colour"].pop(), found["shape"].pop(), found["motion"].pop())


def parse_caption(text: str) -> CaptionSpec:
    """Read the objects and background a toy caption (canonical or expanded) asks for.

    Objects are separated by 'and'; each names one colour, one shape and one motion. The background is named by
    its colour word (never an object colour) and the word 'background' or 'backdrop'. Other words are ignored.
    Raises ValueError for text that is not a toy caption.
    """
    tokens = tokenize(text)
    backgrounds = [_KEYWORDS[t][1] for t in tokens if _KEYWORDS.get(t, ("",))[0] == "background"]
    if len(backgrounds) != 1 or not any(t in _BACKGROUND_NOUNS for t in tokens):
        raise ValueError(f"not a toy caption (needs exactly one background colour and 'background'): {text!r}")
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token == "and":
            segments.append([])
        else:
            segments[-1].append(token)
    objects = tuple(combo for combo in map(_parse_segment, segments) if combo is not None)
    if not objects:
        raise ValueError(f"not a toy caption (names no object): {text!r}")
    return CaptionSpec(objects=objects, background=backgrounds[0])


def vocabulary() -> list[str]:
    """Every token (`tokenize`: words and ',') that canonical captions and expansions can produce, sorted."""
    phrases: list[str] = ["a an and in standing still moving"]
    phrases += [re.sub(r"\{\w+\}", " ", t) for t in _TEMPLATES + _OBJECT_ORDERS]
    phrases += list(_COLOUR_ADJECTIVES) + list(_CANONICAL_MOTION.values())
    for table in (_COLOUR_SYNONYMS, _SHAPE_SYNONYMS, _MOTION_PARTICIPLES, _MOTION_CLAUSES, _BACKGROUND_SYNONYMS):
        phrases += [p for group in table.values() for p in group]
    return sorted({token for phrase in phrases for token in tokenize(phrase)})
