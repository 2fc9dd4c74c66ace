"""Synthetic visual question answering: the vision-language testbed, where p is a list of labelled boxes.

An image is a 3x3 grid of cells on a light background; a scene puts `n_objects` coloured shapes in distinct
cells, each of random size (about 50-85% of the cell) with a small random offset, drawn without antialiasing so
every object pixel has exactly its colour's RGB. x is the image and a question about it; every response first
*locates* the referent, then *reads* the asked attribute, then gives the answer after ``#``:

* ``colour``: ``what colour is the triangle?`` -> ``triangle at top left is red\\n#red`` (the shape is unique);
* ``shape``: ``what shape is the red one?`` -> ``red at mid right is circle\\n#circle`` (the colour is unique);
* ``count``: ``how many red objects?`` -> ``red at top left, bottom mid\\n#2`` (``none\\n#0`` for zero).

Positions are words, rows ``top``/``mid``/``bottom`` and columns ``left``/``mid``/``right``, with the middle
cell written ``centre``. The privileged input p (``box_label``, the default, as in the paper) is the
query-related objects with their labels and pixel boxes ``[x0,y0,x1,y1]`` (x1, y1 exclusive, so
``image.crop(box)`` is the object): ``triangle [8,40,30,62]``; for counts, every object of the colour,
``red [4,3,27,26];red [70,68,90,88]`` (``none`` when there is none). So two kinds of response token exist by
construction, as in the paper's §2.1:

* location tokens (``at top left``, and which objects a count lists) are predictable from p: a box's
  coordinates name its cell, so both models copy them once they see p;
* attribute tokens (the colour or shape word, and hence the answer) need perception of the pixels, which the
  bigger vision encoder does better *whether or not* it sees p (p names the asked attribute only in the
  ``answer`` form).

Hint forms (the paper's Table 5): ``answer`` (``#red``: Final Answer), ``box_caption`` (the box then a caption
that does not name the asked attribute, ``[8,40,30,62] object at top left``: Bounding Box with Caption),
``box_label`` (Bounding Box with Object Label, the default), ``caption`` (no coordinates,
``the triangle is at top left``: Caption), ``none`` (empty: No Privileged Input, the control), and ``mixed``
(one of the five per question, for the SFT stage that teaches both models to read every form).

Splits: ``train``, ``test`` (the same distribution; each example has its own random stream seeded by the split,
the seed and its index, so the splits never share a stream) and ``ood`` (more clutter: `ood_n_objects` objects).
As in the reasoning task, the ``domains`` a task trains on and the ``eval_domains`` it is evaluated on can
differ. Scenes are built so the referent is well defined (the asked shape or colour occurs once; a count's
colour occurs 0..n times, uniformly), never by hoping a random scene happens to qualify.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image, ImageDraw

from dopd.tasks.base import Example, check_domains_and_form

DOMAINS = ("colour", "shape", "count")
HINT_FORMS = ("box_label", "box_caption", "caption", "answer", "none", "mixed")
SPLITS = ("train", "test", "ood")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 99, 235),
    "yellow": (234, 196, 20),
    "purple": (147, 51, 234),
    "orange": (245, 128, 10),
}
SHAPES = ("square", "circle", "triangle", "cross")
BACKGROUND = (245, 245, 240)
GRID = 3  # cells per side
MIN_IMAGE_SIZE = 12 * GRID  # 12 px cells (objects of 6+ px): the smallest where the four shapes look different
SIZE_RANGE = (0.5, 0.85)  # an object's side, as a fraction of the cell
ROWS = ("top", "mid", "bottom")
COLS = ("left", "mid", "right")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cell: tuple[int, int]  # (row, col) in the 3x3 grid
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive: the tight box of its pixels

    @property
    def position(self) -> str:
        return position(self.cell)

    @property
    def box_text(self) -> str:
        return "[" + ",".join(map(str, self.box)) + "]"


@dataclass(frozen=True)
class Scene:
    """One question about one drawn image, with everything the example's strings are made from."""

    image: Image.Image = field(repr=False)
    objects: tuple[SceneObject, ...]  # in reading order
    domain: str
    label: str  # the term the question uses: a shape (colour questions) or a colour (shape/count questions)
    targets: tuple[SceneObject, ...]  # the query-related objects (one, or for counts 0..n), in reading order
    question: str
    answer: str
    solution: str


def position(cell: tuple[int, int]) -> str:
    """A cell as words: ``top left`` .. ``bottom right``; the middle cell is ``centre``."""
    row, col = cell
    return "centre" if (row, col) == (1, 1) else f"{ROWS[row]} {COLS[col]}"


def draw_scene(rng: random.Random, n_objects: int, image_size: int, colours: list[str] | None = None,
               shapes: list[str] | None = None) -> tuple[Image.Image, list[SceneObject]]:
    """Draw `n_objects` objects in distinct random cells; `colours`/`shapes` (one per object, None: random) fix
    what they are. Uses only `rng`: the same stream gives the same pixels. Objects come back in reading order."""
    if not 1 <= n_objects <= GRID * GRID:
        raise ValueError(f"n_objects={n_objects} must be in 1..{GRID * GRID} (one object per cell)")
    colours = list(colours) if colours is not None else [rng.choice(list(COLOURS)) for _ in range(n_objects)]
    shapes = list(shapes) if shapes is not None else [rng.choice(SHAPES) for _ in range(n_objects)]
    if len(colours) != n_objects or len(shapes) != n_objects:
        raise ValueError(f"draw_scene: {len(colours)} colours and {len(shapes)} shapes for {n_objects} objects")
    cell = image_size // GRID
    lo, hi = max(2, round(SIZE_RANGE[0] * cell)), min(cell - 2, round(SIZE_RANGE[1] * cell))
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    objects = []
    for index, colour, shape in zip(rng.sample(range(GRID * GRID), n_objects), colours, shapes):
        row, col = divmod(index, GRID)
        side = rng.randint(lo, hi)
        x0 = col * cell + rng.randint(1, cell - side - 1)  # at least a pixel of background all round
        y0 = row * cell + rng.randint(1, cell - side - 1)
        mask = Image.new("L", image.size, 0)
        _draw_shape(ImageDraw.Draw(mask), shape, x0, y0, side)
        image.paste(COLOURS[colour], (0, 0, *image.size), mask)
        objects.append(SceneObject(colour, shape, (row, col), tuple(mask.getbbox())))
    return image, sorted(objects, key=lambda o: o.cell)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's drawing coordinates are inclusive
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":  # pointing up
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    elif shape == "cross":  # a symmetric plus sign: arms about a third of the side thick, of the side's parity
        t = max(1, round((side / 3 - side % 2) / 2) * 2 + side % 2)
        a = x0 + (side - t) // 2
        b = y0 + (side - t) // 2
        draw.rectangle((a, y0, a + t - 1, y1), fill=255)
        draw.rectangle((x0, b, x1, b + t - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render_hint(form: str, scene: Scene) -> str:
    """p in one of Table 5's forms, from the scene's query-related objects."""
    if form == "answer":
        return f"#{scene.answer}"
    if form == "none":
        return ""
    if not scene.targets:  # a count of zero: the list of related objects is empty
        return "none" if form in ("box_label", "box_caption") else f"there are no {scene.label} ones"
    if form == "box_label":
        return ";".join(f"{scene.label} {o.box_text}" for o in scene.targets)
    if form == "box_caption":
        return ";".join(f"{o.box_text} object at {o.position}" for o in scene.targets)
    if form == "caption":
        places = ", ".join(o.position for o in scene.targets)
        if scene.domain == "count":
            return f"the {scene.label} ones are at {places}"
        return f"the {scene.label}{' one' if scene.domain == 'shape' else ''} is at {places}"
    raise ValueError(f"unknown hint form {form!r}; valid: {HINT_FORMS[:5]}")


@dataclass
class SceneTask:
    """Questions from `domains` (round-robin) about `image_size`-px scenes of `n_objects` objects (`ood`: more).

    `scene(split, seed, i)` is example i with its drawing metadata; `examples` is those scenes as `Example`s.
    """

    name: str = "scenes"
    domains: tuple[str, ...] = DOMAINS
    eval_domains: tuple[str, ...] | None = None  # None: the training domains
    n_objects: int = 3
    ood_n_objects: int = 5
    image_size: int = 96
    hint_form: str = "box_label"
    splits: tuple[str, ...] = SPLITS
    hint_forms: ClassVar[tuple[str, ...]] = HINT_FORMS[:5]  # the forms p can take for evaluation

    def __post_init__(self):
        check_domains_and_form(self, DOMAINS, HINT_FORMS)
        self.splits = tuple(self.splits)
        for key in ("n_objects", "ood_n_objects"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 1 <= value <= GRID * GRID:
                raise ValueError(f"task.{key}={value!r} must be an integer in 1..{GRID * GRID} (one object per cell "
                                 f"of the {GRID}x{GRID} grid); set task.{key}=...")
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"task.image_size={self.image_size!r} must be an integer >= {MIN_IMAGE_SIZE} "
                             f"({GRID} cells of at least {MIN_IMAGE_SIZE // GRID} px); set task.image_size=...")
        if not self.splits or any(s not in SPLITS for s in self.splits) or self.splits[0] != "train":
            raise ValueError(f"task.splits={list(self.splits)} must start with 'train' and use only {list(SPLITS)}")

    # -- generation -------------------------------------------------------------------------------------------
    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` questions of `split`, round-robin over the split's domains; example i depends only on (split,
        seed, i), so a longer list extends a shorter one."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; valid: {self.splits}")
        return [self._example(self.scene(split, seed, i), split, seed, i) for i in range(max(0, n))]

    def scene(self, split: str, seed: int, i: int) -> Scene:
        """Example i of `split`: the drawn image, its objects and the question's strings."""
        domains = self.domains if split == self.splits[0] else self.eval_domains
        domain = domains[i % len(domains)]
        n = self.ood_n_objects if split == "ood" else self.n_objects
        rng = random.Random(f"{self.name}/{split}/{seed}/{i}")
        colours = [rng.choice(list(COLOURS)) for _ in range(n)]
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        if domain == "colour":  # the asked shape occurs exactly once
            label = rng.choice(SHAPES)
            shapes = [label] + [rng.choice([s for s in SHAPES if s != label]) for _ in range(n - 1)]
        else:
            label = rng.choice(list(COLOURS))
            others = [c for c in COLOURS if c != label]
            k = 1 if domain == "shape" else rng.randint(0, n)  # shape: unique colour; count: 0..n, uniformly
            colours = [label] * k + [rng.choice(others) for _ in range(n - k)]
        image, objects = draw_scene(rng, n, self.image_size, colours, shapes)
        key = "shape" if domain == "colour" else "colour"
        targets = tuple(o for o in objects if getattr(o, key) == label)
        if domain == "colour":
            (obj,) = targets
            question, answer = f"what colour is the {label}?", obj.colour
            lead = f"{label} at {obj.position} is {answer}"
        elif domain == "shape":
            (obj,) = targets
            question, answer = f"what shape is the {label} one?", obj.shape
            lead = f"{label} at {obj.position} is {answer}"
        else:
            question, answer = f"how many {label} objects?", str(len(targets))
            lead = f"{label} at " + ", ".join(o.position for o in targets) if targets else "none"
        return Scene(image, tuple(objects), domain, label, targets, question, answer, f"{lead}\n#{answer}")

    def _example(self, scene: Scene, split: str, seed: int, i: int) -> Example:
        # "mixed" draws the form from its own stream, so the scenes are the same for every form
        form = self.hint_form
        if form == "mixed":
            form = random.Random(f"{self.name}/{split}/{seed}/{i}/form").choice(HINT_FORMS[:5])
        return Example(scene.question, render_hint(form, scene), scene.answer, scene.solution, domain=scene.domain,
                       image=scene.image)

    # -- verification -----------------------------------------------------------------------------------------
    def extract_answer(self, response: str) -> str | None:
        """The first word after the last ``#``, lowercased; None without one."""
        if "#" not in response:
            return None
        words = response.rsplit("#", 1)[1].strip().lower().split()
        return words[0] if words else None

    def is_correct(self, response: str, example: Example) -> bool:
        return self.extract_answer(response) == example.answer
