"""Synthetic scenes for the demo: coloured shapes, their captions and question-answer pairs.

Pure data rules only (no images, no I/O): a scene is a small tuple of objects, and
everything said about it (caption, questions, answers, guesser baselines) is computed from
that tuple, so the tests can check every answer against the scene that produced it.
Drawing lives in `synthetic_render.py`, writing files in `synthetic_io.py`.

Layout rule: the square image is a 3x3 grid; an object sits in one of five cells,
named by where it is: left (middle row, left column), right, top (top row, middle column),
bottom, center. At most one object per cell, so objects never overlap or touch, and every
question has exactly one correct answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from bunny.errors import BunnyError

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Reading order (top to bottom, left to right) so captions list objects as a reader scans.
POSITIONS: tuple[str, ...] = ("top", "left", "center", "right", "bottom")
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}
_COUNT_WORD = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 3
# Probability that a new object repeats an earlier object's colour and shape; without it
# "two blue squares" would be rare (1 in 24 per pair) and counts above 1 hard to learn.
_REPEAT_P = 0.3


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str
    # Geometry in pixels of a 64x64 image; drawing jitter so no two scenes are pixel-equal.
    radius: float = 7.0
    dx: float = 0.0
    dy: float = 0.0

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise BunnyError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise BunnyError(f"two objects share a position: {positions}")
        for o in self.objects:
            if o.colour not in COLOURS or o.shape not in SHAPES or o.position not in POSITIONS:
                raise BunnyError(f"unknown colour/shape/position in {o}; valid: "
                                 f"{COLOURS}, {SHAPES}, {POSITIONS}")

    @property
    def colours(self) -> set[str]:
        return {o.colour for o in self.objects}

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def to_list(self) -> list[dict]:
        return [o.to_dict() for o in self.objects]


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """One independent stream per (seed, split, image): image i does not depend on how many
    images are drawn, and splits never share a stream. String seeds are hashed with SHA-512
    by `random`, so this is stable across runs and platforms."""
    return random.Random(f"bunny-synth/{seed}/{split}/{index}")


def hard_pairs(scene: Scene) -> list[tuple[str, str]]:
    """(colour, shape) pairs whose colour and shape both appear, but never together."""
    return [(c, s) for c in COLOURS for s in SHAPES
            if c in scene.colours and s in scene.shapes and (c, s) not in scene.pairs]


def easy_pairs(scene: Scene) -> list[tuple[str, str]]:
    """(colour, shape) pairs of which neither the colour nor the shape appears."""
    return [(c, s) for c in COLOURS for s in SHAPES
            if c not in scene.colours and s not in scene.shapes]


def sample_scene(rng: random.Random, need_hard: bool = False) -> Scene:
    """Draw 1-3 objects in distinct cells. `need_hard` redraws until a hard "no" question
    exists (needs two objects differing in both colour and shape)."""
    while True:
        n = rng.choice((2, 3) if need_hard else (1, 2, 3))
        cells = rng.sample(POSITIONS, n)
        objects: list[SceneObject] = []
        for cell in cells:
            if objects and rng.random() < _REPEAT_P:
                src = rng.choice(objects)
                colour, shape = src.colour, src.shape
            else:
                colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            objects.append(SceneObject(colour, shape, cell, radius=round(rng.uniform(6.5, 8.0), 3),
                                       dx=round(rng.uniform(-1.0, 1.0), 3),
                                       dy=round(rng.uniform(-1.0, 1.0), 3)))
        objects.sort(key=lambda o: POSITIONS.index(o.position))
        scene = Scene(tuple(objects))
        if not need_hard or hard_pairs(scene):
            return scene


def caption(scene: Scene) -> str:
    """E.g. "a red circle on the left and two blue squares at the top and on the right".
    Objects of the same colour and shape are grouped so the caption states counts."""
    groups: dict[tuple[str, str], list[str]] = {}
    for o in scene.objects:  # objects are in reading order, so groups are too
        groups.setdefault((o.colour, o.shape), []).append(o.position)
    phrases = []
    for (colour, shape), where in groups.items():
        noun = shape if len(where) == 1 else _PLURAL[shape]
        count = _COUNT_WORD[len(where)]
        if count == "a" and colour[0] in "aeiou":
            count = "an"  # "an orange circle"
        phrases.append(f"{count} {colour} {noun} {_join([_WHERE[w] for w in where])}")
    return _join(phrases)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def yes_no_question(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"  # "an orange circle"
    return f"Is there {article} {colour} {shape} in the image?"


def yes_no_qas(scene: Scene, rng: random.Random, no_kind: str) -> list[dict]:
    """One "yes" and one "no" question about the same image (MME-style pair). `no_kind` is
    "hard" (colour and shape both present, not together) or "easy" (neither present)."""
    if no_kind not in ("hard", "easy"):
        raise BunnyError(f"no_kind must be 'hard' or 'easy', got {no_kind!r}")
    yes = rng.choice(sorted(scene.pairs))
    candidates = hard_pairs(scene) if no_kind == "hard" else easy_pairs(scene)
    if not candidates:
        raise BunnyError(f"scene {scene.to_list()} has no {no_kind} 'no' question")
    return yes_no_pair(yes, rng.choice(candidates), no_kind)


def yes_no_pair(yes: tuple[str, str], no: tuple[str, str], no_kind: str) -> list[dict]:
    """The two QA records asking about the (colour, shape) pairs `yes` and `no`."""
    return [
        {"question": yes_no_question(*yes), "answer": "yes", "kind": "yes_no",
         "category": "positive", "colour": yes[0], "shape": yes[1]},
        {"question": yes_no_question(*no), "answer": "no", "kind": "yes_no",
         "category": no_kind, "colour": no[0], "shape": no[1]},
    ]


def extra_yes_no_qas(scene: Scene, rng: random.Random, asked: list[dict], pairs: int,
                     hard_share: float = 0.5) -> list[dict]:
    """Up to `pairs` more yes/no pairs about the scene, none repeating a question in `asked`:
    as many "yes" as "no" (limited by the scene's distinct colour-shape pairs), the "no"
    ones alternating hard and easy where both exist (`hard_share` 0.5), or hard with
    probability `hard_share`. Training data only: the evaluation keeps one MME-style pair
    per image."""
    seen = {(q["colour"], q["shape"]) for q in asked if q.get("kind") == "yes_no"}
    yes = [p for p in sorted(scene.pairs) if p not in seen]
    hard = [p for p in hard_pairs(scene) if p not in seen]
    easy = [p for p in easy_pairs(scene) if p not in seen]
    rng.shuffle(yes)
    rng.shuffle(hard)
    rng.shuffle(easy)
    out = []
    for k in range(min(pairs, len(yes), len(hard) + len(easy))):
        want_hard = k % 2 == 0 if hard_share == 0.5 else rng.random() < hard_share
        no_kind = "hard" if (want_hard and hard) or not easy else "easy"
        no = (hard if no_kind == "hard" else easy).pop()
        out += yes_no_pair(yes[k], no, no_kind)
    return out


def open_qas(scene: Scene, rng: random.Random) -> list[dict]:
    """Short-answer questions, each asked only where its answer is unique:
    colour of a shape, shape of a colour, count of a shape, position of a single object."""
    qas = []
    one_colour = [s for s in sorted(scene.shapes)
                  if len({o.colour for o in scene.objects if o.shape == s}) == 1]
    if one_colour:
        s = rng.choice(one_colour)
        n = sum(o.shape == s for o in scene.objects)
        q = f"What color is the {s}?" if n == 1 else f"What color are the {_PLURAL[s]}?"
        answer = next(o.colour for o in scene.objects if o.shape == s)
        qas.append({"question": q, "answer": answer, "category": "colour", "shape": s})
    one_shape = [c for c in sorted(scene.colours)
                 if len({o.shape for o in scene.objects if o.colour == c}) == 1]
    if one_shape:
        c = rng.choice(one_shape)
        answer = next(o.shape for o in scene.objects if o.colour == c)
        qas.append({"question": f"What shape is the {c} object?", "answer": answer,
                    "category": "shape", "colour": c})
    s = rng.choice(sorted(scene.shapes))
    qas.append({"question": f"How many {_PLURAL[s]} are there?",
                "answer": str(sum(o.shape == s for o in scene.objects)),
                "category": "count", "shape": s})
    single = [o for o in scene.objects
              if sum((p.colour, p.shape) == (o.colour, o.shape) for p in scene.objects) == 1]
    if single:
        o = rng.choice(single)
        qas.append({"question": f"Where is the {o.colour} {o.shape}?", "answer": o.position,
                    "category": "position", "colour": o.colour, "shape": o.shape})
    for qa in qas:
        qa["kind"] = "open"
    return qas


def no_kind_for(index: int) -> str:
    """Alternate hard/easy "no" questions by image index: any even number of images gives
    exactly as many hard as easy ones."""
    return "hard" if index % 2 == 0 else "easy"


def draw_example(seed: int, split: str, index: int, no_kind: str | None = None) -> tuple[Scene, list[dict]]:
    """The scene for image `index` of `split` and all its questions (yes/no pair first).
    `no_kind` ("hard"/"easy") overrides the alternation by index (training mixtures)."""
    rng = scene_rng(seed, split, index)
    kind = no_kind or no_kind_for(index)
    scene = sample_scene(rng, need_hard=kind == "hard")
    return scene, yes_no_qas(scene, rng, kind) + open_qas(scene, rng)


# ---- guesser baselines (pure, over yes/no eval records) ----

def _yes_no(records) -> list[dict]:
    out = [r for r in records if r.get("kind") == "yes_no"]
    if not out:
        raise BunnyError("no yes/no records given (kind == 'yes_no')")
    return out


def _guess_accuracy(records, attribute: str) -> float:
    rows = _yes_no(records)
    right = 0
    for r in rows:
        present = {o[attribute] for o in r["scene"]}
        guess = "yes" if r[attribute] in present else "no"
        right += guess == r["answer"]
    return right / len(rows)


def colour_only_guess_accuracy(records) -> float:
    """Accuracy of answering "yes" iff the asked colour is in the image, ignoring shapes.
    Records need `kind`, `answer`, `colour` (asked) and `scene` (list of objects);
    records of other kinds are ignored. 0.75 on a balanced split (hard "no" fools it)."""
    return _guess_accuracy(records, "colour")


def shape_only_guess_accuracy(records) -> float:
    """Like `colour_only_guess_accuracy`, looking only at shapes."""
    return _guess_accuracy(records, "shape")


def majority_answer_accuracy(records, category: str) -> float:
    """Accuracy of giving every open question of `category` its most common answer, without
    looking at the image: the floor an answer prior reaches.
    For count it is high (most questions ask about a shape present once, so "1"); a model at
    this figure has learned the prior, not to count."""
    answers = [r["answer"] for r in records if r.get("kind") == "open" and r.get("category") == category]
    if not answers:
        raise BunnyError(f"no open records of category {category!r} given")
    return max(answers.count(a) for a in set(answers)) / len(answers)
