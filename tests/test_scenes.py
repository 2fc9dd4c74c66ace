"""The visual testbed: answers are what the pixels show, hints are the forms Table 5 names, splits hold."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dopd.pipeline import build_task
from dopd.tasks.scenes import (BACKGROUND, COLOURS, DOMAINS, HINT_FORMS, SHAPES, SceneTask, draw_scene,
                               position, render_hint)
from dopd.tokenizer import char_tokenizer

BOX = re.compile(r"\[(\d+),(\d+),(\d+),(\d+)\]")
RGB = {rgb: name for name, rgb in COLOURS.items()}


def crop_mask(image, box, rgb) -> list[list[bool]]:
    """Which pixels of the box have exactly colour `rgb`."""
    x0, y0, x1, y1 = box
    return (np.asarray(image)[y0:y1, x0:x1] == rgb).all(-1).tolist()


def dominant_colour(image, box) -> str:
    """The most common non-background colour inside the box, by name."""
    pixels = Counter(image.crop(box).getdata())
    pixels.pop(BACKGROUND, None)
    return RGB[pixels.most_common(1)[0][0]]


def classify_shape(mask: list[list[bool]]) -> str:
    """An independent shape reader working from the filled pixels only."""
    h, w = len(mask), len(mask[0])
    if all(all(row) for row in mask):
        return "square"
    if all(mask[-1]) and sum(mask[0]) < w / 2:  # a full base and a narrow top
        return "triangle"
    near_corner = mask[h // 5][w // 5]  # inside a circle, outside a plus sign
    return "circle" if near_corner else "cross"


def cells_with(image, rgb, n_cells: int = 3) -> int:
    """How many grid cells hold a pixel of colour `rgb` (each cell holds at most one object)."""
    cell = image.size[0] // n_cells
    hit = (np.asarray(image) == rgb).all(-1)
    return sum(bool(hit[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].any())
               for r in range(n_cells) for c in range(n_cells))


def test_deterministic_and_prefix_stable():
    a, b = SceneTask().examples("train", 30, 0), SceneTask().examples("train", 30, 0)
    assert a == b and [x.image.tobytes() for x in a] == [x.image.tobytes() for x in b]
    assert [x.key for x in a[:10]] == [x.key for x in SceneTask().examples("train", 10, 0)]
    assert [x.domain for x in a[:3]] == list(DOMAINS)  # round-robin
    assert all(x.image.mode == "RGB" and x.image.size == (96, 96) for x in a)


def test_splits_and_seeds_differ():
    task = SceneTask()
    train = {x.key for x in task.examples("train", 300, 0)}
    assert len(train) == 300
    for split in ("test", "ood"):
        assert not train & {x.key for x in task.examples(split, 300, 0)}
    assert not train & {x.key for x in task.examples("train", 300, 1)}
    with pytest.raises(ValueError, match="unknown split"):
        task.examples("val", 2, 0)


def test_strings_use_only_tokenizer_characters():
    tok = char_tokenizer()
    for form in HINT_FORMS:
        for ex in SceneTask(hint_form=form).examples("ood", 30, 0) + SceneTask(hint_form=form).examples("test", 30, 0):
            for text in (ex.question, ex.hint, ex.solution, ex.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids and tok.decode(ids) == text, text


@pytest.mark.parametrize("split", ["train", "ood"])
def test_metadata_matches_pixels_and_referents_are_unique(split):
    task = SceneTask()
    n = task.ood_n_objects if split == "ood" else task.n_objects
    for i in range(60):
        scene = task.scene(split, 0, i)
        image, objects = scene.image, scene.objects
        assert len(objects) == n == len({o.cell for o in objects})
        assert sum(cells_with(image, rgb) for rgb in COLOURS.values()) == n  # n objects are drawn, one per cell
        outside = np.ones(image.size[::-1], dtype=bool)
        cell = task.image_size // 3
        for o in objects:
            x0, y0, x1, y1 = o.box
            row, col = o.cell
            assert col * cell < x0 < x1 < (col + 1) * cell and row * cell < y0 < y1 < (row + 1) * cell
            assert 0.45 * cell <= x1 - x0 <= 0.9 * cell and x1 - x0 == y1 - y0
            mask = crop_mask(image, o.box, COLOURS[o.colour])
            assert any(mask[0]) and any(mask[-1]) and any(r[0] for r in mask) and any(r[-1] for r in mask)  # tight
            assert set(image.crop(o.box).getdata()) <= {COLOURS[o.colour], BACKGROUND}
            assert classify_shape(mask) == o.shape, (split, i, o)
            outside[y0:y1, x0:x1] = False
        assert (np.asarray(image)[outside] == BACKGROUND).all()  # nothing is drawn outside the boxes
        if scene.domain == "colour":
            assert [o.shape for o in objects].count(scene.label) == 1
        elif scene.domain == "shape":
            assert [o.colour for o in objects].count(scene.label) == 1
        else:
            assert scene.targets == tuple(o for o in objects if o.colour == scene.label)


@pytest.mark.parametrize("split", ["test", "ood"])
def test_answers_are_what_the_pixels_show(split):
    task = SceneTask()
    counts = Counter()
    for ex in task.examples(split, 240, 0):
        boxes = [tuple(map(int, m)) for m in BOX.findall(ex.hint)]
        if ex.domain == "colour":  # read the colour inside the hinted box
            (box,) = boxes
            assert dominant_colour(ex.image, box) == ex.answer
            x0, y0, x1, y1 = box
            assert ex.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLOURS[ex.answer]  # all shapes fill it
        elif ex.domain == "shape":  # read the shape of the hinted box's pixels
            (box,) = boxes
            colour = ex.question.split()[4]
            assert classify_shape(crop_mask(ex.image, box, COLOURS[colour])) == ex.answer
        else:  # count the cells holding the colour
            colour = ex.question.split()[2]
            assert cells_with(ex.image, COLOURS[colour]) == int(ex.answer) == len(boxes)
            assert all(dominant_colour(ex.image, box) == colour for box in boxes)
            counts[ex.answer] += 1
    n = task.ood_n_objects if split == "ood" else task.n_objects
    assert set(counts) == {str(k) for k in range(n + 1)}  # every count 0..n occurs
    assert max(counts.values()) < 0.5 * sum(counts.values())  # and none dominates


def test_answer_distribution_is_not_degenerate():
    exs = SceneTask().examples("train", 600, 0)
    for domain, values in (("colour", COLOURS), ("shape", SHAPES)):
        seen = Counter(ex.answer for ex in exs if ex.domain == domain)
        assert set(seen) == set(values) and max(seen.values()) < 0.4 * sum(seen.values()), (domain, seen)


def test_solutions_locate_then_answer():
    task = SceneTask()
    for i in range(30):
        s = task.scene("train", 0, i)
        line, answer = s.solution.split("\n")
        assert answer == f"#{s.answer}"
        if s.domain in ("colour", "shape"):
            (o,) = s.targets
            assert line == f"{s.label} at {o.position} is {s.answer}"
        else:
            assert line == (f"{s.label} at " + ", ".join(o.position for o in s.targets) if s.targets else "none")
    assert position((1, 1)) == "centre" and position((0, 2)) == "top right" and position((2, 1)) == "bottom mid"


def test_hint_forms():
    by_form = {form: SceneTask(hint_form=form).examples("test", 60, 0) for form in HINT_FORMS}
    keys = [ex.key for ex in by_form["box_label"]]
    for form, exs in by_form.items():  # the scenes do not depend on the form
        assert [ex.key for ex in exs] == keys, form
    scenes = [SceneTask().scene("test", 0, i) for i in range(60)]
    zero = 0
    for s, label, capbox, cap, ans, none in zip(scenes, *(by_form[f] for f in HINT_FORMS[:5])):
        boxes = [o.box_text for o in s.targets]
        assert none.hint == "" and ans.hint == f"#{s.answer}"
        if not s.targets:
            zero += 1
            assert label.hint == capbox.hint == "none" and cap.hint == f"there are no {s.label} ones"
            continue
        assert label.hint == ";".join(f"{s.label} {b}" for b in boxes)
        assert capbox.hint == ";".join(f"{b} object at {o.position}" for b, o in zip(boxes, s.targets))
        assert s.answer not in capbox.hint.split() and s.answer not in cap.hint.split()  # no asked attribute
        assert not BOX.search(cap.hint) and cap.hint.startswith(f"the {s.label}")
        assert all(o.position in cap.hint for o in s.targets)
    assert zero > 0  # count questions with an empty list occur
    with_box = [ex for ex in by_form["box_label"] if ex.domain == "colour"]
    assert with_box and all(re.fullmatch(r"[a-z]+ \[\d+,\d+,\d+,\d+\]", ex.hint) for ex in with_box)


def test_mixed_uses_all_five_forms():
    task = SceneTask()
    scenes = [task.scene("train", 0, i) for i in range(100)]
    renders = [{form: render_hint(form, s) for form in HINT_FORMS[:5]} for s in scenes]
    used = Counter()
    for ex, r in zip(SceneTask(hint_form="mixed").examples("train", 100, 0), renders):
        matches = [form for form, text in r.items() if text == ex.hint]
        assert matches
        used[matches[0] if len(matches) == 1 else "ambiguous"] += 1
    assert set(HINT_FORMS[:5]) <= set(used)


def test_answer_checker():
    task = SceneTask()
    for ex in task.examples("test", 30, 0):
        assert task.is_correct(ex.solution, ex)
        assert task.is_correct(f"whatever\n# {ex.answer.upper()} done", ex)
        wrong = "0" if ex.answer != "0" else "1"
        wrong = {"colour": "blue" if ex.answer != "blue" else "red",
                 "shape": "cross" if ex.answer != "cross" else "circle"}.get(ex.domain, wrong)
        assert not task.is_correct(ex.solution.rsplit("#", 1)[0] + f"#{wrong}", ex)
        assert not task.is_correct(ex.solution.replace("#", ""), ex)
    assert task.extract_answer("a#b\n#Red  x") == "red"
    assert task.extract_answer("no marker") is None and task.extract_answer("end #  ") is None


def test_ood_is_more_cluttered_and_domains_are_configurable():
    task = SceneTask(n_objects=2, ood_n_objects=6, domains=["colour"], eval_domains=["shape", "count"])
    assert all(len(task.scene("train", 0, i).objects) == 2 for i in range(10))
    assert all(len(task.scene("ood", 0, i).objects) == 6 for i in range(10))
    assert {ex.domain for ex in task.examples("train", 10, 0)} == {"colour"}
    assert {ex.domain for ex in task.examples("test", 10, 0)} == {"shape", "count"}
    small = SceneTask(image_size=36, n_objects=9)
    for i in range(9):
        s = small.scene("train", 0, i)
        assert s.image.size == (36, 36) and len(s.objects) == 9
        assert all(dominant_colour(s.image, o.box) == o.colour for o in s.objects)
        assert all(classify_shape(crop_mask(s.image, o.box, COLOURS[o.colour])) == o.shape for o in s.objects)


def test_draw_scene_is_pure():
    a_img, a = draw_scene(random.Random(7), 4, 60)
    b_img, b = draw_scene(random.Random(7), 4, 60)
    assert a == b and a_img.tobytes() == b_img.tobytes() and len(a) == 4
    _, fixed = draw_scene(random.Random(1), 2, 48, colours=["red", "red"], shapes=["cross", "circle"])
    assert sorted((o.colour, o.shape) for o in fixed) == [("red", "circle"), ("red", "cross")]
    with pytest.raises(ValueError, match="n_objects"):
        draw_scene(random.Random(0), 10, 96)


@pytest.mark.parametrize("kwargs,match", [
    ({"domains": ["colour", "size"]}, "task.domains"),
    ({"domains": []}, "task.domains"),
    ({"eval_domains": ["texture"]}, "task.eval_domains"),
    ({"hint_form": "bbox"}, "task.hint_form"),
    ({"n_objects": 0}, "task.n_objects"),
    ({"n_objects": 10}, "task.n_objects"),
    ({"ood_n_objects": 12}, "task.ood_n_objects"),
    ({"image_size": 35}, "task.image_size"),
    ({"image_size": 96.0}, "task.image_size"),
    ({"splits": ["test", "ood"]}, "task.splits"),
    ({"splits": ["train", "val"]}, "task.splits"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneTask(**kwargs)


def test_config_builds_with_every_field():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "task" / "scenes.yaml")
    task = build_task(cfg)
    assert isinstance(task, SceneTask) and task.hint_form == "box_label" and task.domains == DOMAINS
    assert set(cfg) - {"_target_", "view"} == {f.name for f in fields(SceneTask)}
    assert "{image}" in cfg.view.plain and "{hint}" in cfg.view.privileged and "{image}" in cfg.view.privileged
