"""The JSONL task: bad files fail at once with file:line, the field and the fix; good files sample reproducibly."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from dopd.pipeline import build_task
from dopd.tasks.base import Example
from dopd.tasks.jsonl import JsonlTask
from tests.conftest import CONF, compose_cfg

GOOD = {"prompt": "What is 2+3*4?", "privileged": "Multiply first.", "answer": "14"}


def _write(path, *lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _task(tmp_path, *train_lines, **kw) -> JsonlTask:
    test = _write(tmp_path / "test.jsonl", GOOD)
    return JsonlTask(files={"train": _write(tmp_path / "train.jsonl", *train_lines), "test": test}, **kw)


BROKEN = [  # (second line of train.jsonl, the words the one-line message must contain)
    ('{"prompt": "a", "privileged": "b", "answer": "1"', ["not valid JSON", "column"]),
    ('["a", "b"]', ["a JSON array where an object was expected"]),
    ({"prompt": "a", "answer": "1"}, ['missing required field "privileged"']),
    ({"prompt": "a", "privileged": "  ", "answer": "1"}, ['field "privileged" is empty', "give it text"]),
    ({"prompt": "a", "privileged": "b", "answer": 1}, ['field "answer" is a number', 'quote it: "answer": "1"']),
    ({"prompt": "a", "privileged": "b", "answer": None}, ['field "answer" is null']),
    ({"prompt": "a", "privileged": "b", "answer": "1", "domain": ["x"]}, ['field "domain" is an array', "write it as a string"]),
    ({"prompt": "a", "privilged": "b", "answer": "1"}, ['unknown field "privilged"', "typo", "task.ignore_fields"]),
]


@pytest.mark.parametrize("line,words", BROKEN, ids=[w[0][:24] for _, w in BROKEN])
def test_a_broken_line_is_named_with_file_line_field_and_fix(tmp_path, line, words):
    with pytest.raises(ValueError) as err:
        _task(tmp_path, GOOD, line)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'train.jsonl'}:2: ")
    for w in words:
        assert w in msg, (w, msg)


def test_missing_empty_and_single_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task.files.test: .*nope.jsonl does not exist.*fix the path"):
        JsonlTask(files={"train": _write(tmp_path / "train.jsonl", GOOD), "test": str(tmp_path / "nope.jsonl")})
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"task.files.train: .*empty.jsonl is empty"):
        JsonlTask(files={"train": str(tmp_path / "empty.jsonl"), "test": _write(tmp_path / "t.jsonl", GOOD)})
    with pytest.raises(ValueError, match="at least one evaluation split"):
        JsonlTask(files={"train": _write(tmp_path / "train.jsonl", GOOD)})
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        JsonlTask(files={"train": str(tmp_path / "latin1.jsonl"), "test": _write(tmp_path / "t.jsonl", GOOD)})


def test_ignore_fields_and_optional_fields(tmp_path):
    task = _task(tmp_path, {**GOOD, "id": 7, "domain": "algebra", "solution": "12+2=14, \\boxed{14}"},
                 ignore_fields=["id"])
    (ex,) = task.examples("train", 1, 0)
    assert ex == Example("What is 2+3*4?", "Multiply first.", "14", "12+2=14, \\boxed{14}", "algebra")
    assert task.splits == ("train", "test")


def test_examples_are_a_seeded_subset_without_duplicates(tmp_path, caplog):
    rows = [{**GOOD, "prompt": f"q{i}"} for i in range(20)]
    task = _task(tmp_path, *rows)
    a, b, c = task.examples("train", 5, 0), task.examples("train", 5, 0), task.examples("train", 5, 1)
    assert a == b and a != c and len({e.question for e in a}) == 5
    with caplog.at_level(logging.WARNING):
        every = task.examples("train", 50, 0)
    assert sorted(e.question for e in every) == sorted(r["prompt"] for r in rows)  # all of them, once each
    assert "50 train examples asked for, the split has 20" in caplog.text
    with pytest.raises(ValueError, match="unknown split 'ood'"):
        task.examples("ood", 1, 0)


def test_answers_are_checked_with_math_verify(tmp_path):
    task = _task(tmp_path, {**GOOD, "answer": "3/4"})
    (ex,) = task.examples("train", 1, 0)
    assert task.is_correct("so the answer is \\boxed{\\frac{3}{4}}.", ex)
    assert task.is_correct("0.75", ex)
    assert not task.is_correct("\\boxed{4/3}", ex)
    assert task.extract_answer("a \\boxed{x^{2}} b") == "x^{2}"


def test_shipped_config_builds_with_relative_paths_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example files are found under the project root
    task = build_task(compose_cfg(["task=jsonl"], tmp_path).task)
    assert task.splits == ("train", "test") and len(task.examples("test", 100, 0)) == 4
    for ex in task.examples("train", 100, 0):  # every shipped solution is judged correct by the task itself
        assert task.is_correct(ex.solution, ex), ex


def test_image_field_names_a_file_next_to_the_jsonl(tmp_path):
    """Vision rows: `image` is checked when the task is built (file:line if missing) and kept as an absolute path."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    task = _task(tmp_path, {**GOOD, "image": "img/a.png"})
    (ex,) = task.examples("train", 1, 0)
    assert ex.image == str(tmp_path / "img" / "a.png") and ex.key.endswith("a.png")
    assert ex.to_dict()["image"] == ex.image
    with pytest.raises(ValueError, match=r"train.jsonl:1: field \"image\" names .*missing.png, which does not exist"):
        _task(tmp_path, {**GOOD, "image": "img/missing.png"})


def test_shipped_vision_config_builds_and_opens_its_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["task=jsonl_vision", "model=tiny_random_vl"], tmp_path)
    task = build_task(cfg.task)
    rows = task.examples("test", 100, 0)
    assert len(rows) == 4 and all(Path(ex.image).is_file() for ex in rows)
    from dopd.models import load_pair
    from dopd.pipeline import build_view
    from omegaconf import OmegaConf

    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True))
    ctx = build_view(cfg, pair.tokenizer, pair.processor).contexts(rows, privileged=True)
    assert ctx.vision["image_grid_thw"].shape == (4, 3)


@pytest.mark.slow
def test_train_py_reports_a_broken_file_in_one_line_and_marks_the_run_failed(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", GOOD, {"prompt": "a", "answer": "1"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = subprocess.run([sys.executable, "train.py", "task=jsonl", f"task.files.train={bad}", "model=tiny_random",
                          f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}/out"],
                         capture_output=True, text=True, timeout=300, cwd=Path(CONF).parent)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if f"{bad}:2:" in ln]
    assert len(lines) == 1 and 'missing required field "privileged"' in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    assert run.info.status == "FAILED" and 'missing required field "privileged"' in run.data.tags["error"]


def _one_line(err, where: str, *words):
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(where), msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_duplicate_key_is_named_not_silently_overwritten(tmp_path):
    with pytest.raises(ValueError) as err:
        _task(tmp_path, GOOD, '{"prompt": "a", "privileged": "b", "answer": "1", "answer": "2"}')
    _one_line(err, f"{tmp_path / 'train.jsonl'}:2: ", 'field "answer" appears more than once', "keep one")


def test_a_gold_answer_math_verify_cannot_parse_is_named(tmp_path):
    with pytest.raises(ValueError) as err:
        _task(tmp_path, GOOD, {**GOOD, "answer": "\\frac{1}{2"})
    _one_line(err, f"{tmp_path / 'train.jsonl'}:2: ", 'field "answer"', "math-verify can", "task.check_answers=false")
    task = _task(tmp_path, GOOD, {**GOOD, "answer": "\\frac{1}{2"}, check_answers=False)  # the opt-out
    assert len(task.rows["train"]) == 2
    _task(tmp_path, *({**GOOD, "answer": a} for a in ("yes", "Paris", "(1,2]", "x^{2}", "-3.5")))  # all parse


def test_an_overlong_line_is_named_with_the_limit(tmp_path):
    with pytest.raises(ValueError) as err:
        _task(tmp_path, GOOD, {**GOOD, "prompt": "x" * 10_000_000})
    _one_line(err, f"{tmp_path / 'train.jsonl'}:2: ", "task.max_line_bytes=1048576")
    with pytest.raises(ValueError, match=r"train.jsonl:1: .*task.max_line_bytes=100 "):
        _task(tmp_path, {**GOOD, "prompt": "x" * 200}, max_line_bytes=100)


def test_an_evaluation_split_equal_to_the_training_file_is_refused(tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD, {**GOOD, "prompt": "q2"})
    with pytest.raises(ValueError) as err:
        JsonlTask(files={"train": train, "test": train})
    _one_line(err, "task.files.test: ", "is the same file as task.files.train", "held-out")
    copy = _write(tmp_path / "copy.jsonl", GOOD, {**GOOD, "prompt": "q2"})
    with pytest.raises(ValueError) as err:
        JsonlTask(files={"train": train, "test": _write(tmp_path / "t.jsonl", GOOD), "ood": copy})
    _one_line(err, f"task.files.ood: {copy} has the same content as task.files.train")


def test_non_utf8_bytes_are_named_with_file_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError) as err:
        JsonlTask(files={"train": str(tmp_path / "latin1.jsonl"), "test": _write(tmp_path / "t.jsonl", GOOD)})
    _one_line(err, f"{tmp_path / 'latin1.jsonl'}:2: not UTF-8 text", "at byte 16 of the line")


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_an_image_pil_cannot_open_is_named_with_file_line(tmp_path, damage):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name, fmt in (("a.png", "PNG"), ("a.jpg", "JPEG")):
        Image.effect_noise((64, 64), 40).convert("RGB").save(tmp_path / "img" / name, fmt)
    for name in ("a.png", "a.jpg"):
        f = tmp_path / "img" / name
        data = f.read_bytes()
        f.write_bytes({"truncated": data[: len(data) // 2], "not_an_image": b"<html>404</html>", "empty": b""}[damage])
        with pytest.raises(ValueError) as err:
            _task(tmp_path, GOOD, {**GOOD, "image": f"img/{name}"})
        _one_line(err, f"{tmp_path / 'train.jsonl'}:2: ", f'field "image" names {f}, which PIL cannot open')
