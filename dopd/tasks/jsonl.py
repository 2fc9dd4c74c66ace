"""Your own data: one JSONL file per split, each line a prompt with its privileged text and checkable answer.

    {"prompt": "What is 2+3*4?", "privileged": "Multiply first.", "answer": "14", "domain": "math"}

Required: `prompt` (x), `privileged` (p), `answer` (checked with math-verify, see dopd/answers.py). Optional:
`domain`, `solution` (a reference response, only used by SFT), `image` (a file, relative to the JSONL file's
folder: x's image, for vision-language pairs; `task=jsonl_vision`). Every file is read and validated when the task
is built, before any model is loaded, so a typo costs seconds, not a model load: the error names file:line,
the field and the fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dopd import answers
from dopd.tasks.base import Example, seeded_subset

log = logging.getLogger(__name__)

REQUIRED = ("prompt", "privileged", "answer")
OPTIONAL = ("domain", "solution", "image")


def resolve(path: str, root: str | Path | None) -> Path:
    """As given (absolute, or relative to the working directory) if it exists there, else under the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or root is None:
        return p
    under_root = Path(root) / p
    return under_root if under_root.exists() else p


def _names(keys) -> str:
    return ", ".join(f'"{k}"' for k in keys)


_JSON_TYPE = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object", type(None): "null"}
_SHAPE = '{"prompt": ..., "privileged": ..., "answer": ...}'


MAX_LINE_BYTES = 1 << 20  # 1 MiB: far past any model's context; longer lines are runaway dumps (task.max_line_bytes)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_jsonl(path: Path, split: str, ignore_fields: tuple[str, ...] = (), *, max_line_bytes: int = MAX_LINE_BYTES,
               check_answers: bool = True, images: dict | None = None) -> list[Example]:
    """Parse and validate one file; raise at the first bad line with `file:line: what; how to fix`.

    Messages quote with double quotes only, so they stay readable when Hydra shows them as a repr.
    """
    if not path.is_file():
        raise FileNotFoundError(f"task.files.{split}: {path} does not exist (relative paths are tried from the working "
                                "directory, then the project root); fix the path or remove the split")
    known = set(REQUIRED) | set(OPTIONAL) | set(ignore_fields)
    rows: list[Example] = []
    images = {} if images is None else images  # image path -> None (opens) or the error, shared across files
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(max_line_bytes + 1)  # bounded: a 10 GB line without a newline is not read whole
            if not raw:
                break
            where = f"{path}:{lineno}"
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise ValueError(f"{where}: the line is longer than task.max_line_bytes={max_line_bytes} bytes (a "
                                 "runaway dump or a missing newline?); split or shorten it, or raise task.max_line_bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line); save "
                                 "the file as UTF-8 JSON lines") from None
            if line.strip():  # blank lines (a trailing newline, a separator) carry nothing
                rows.append(_row(line.rstrip("\r\n"), where, known, path.parent, check_answers, images))
    if not rows:
        raise ValueError(f"task.files.{split}: {path} is empty (no JSON lines); write one object per line, "
                         f"{_SHAPE}, or point task.files.{split} at another file")
    return rows


def _check_image(image: Path, where: str, images: dict) -> None:
    """Open and decode the image once (JPEGs in draft mode: a reduced decode that still reads the whole file)."""
    if str(image) not in images:
        from PIL import Image

        try:
            with Image.open(image) as im:
                im.draft("RGB", (64, 64))
                im.load()
            images[str(image)] = None
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            images[str(image)] = f"{type(err).__name__}: {err}".replace("'", '"')
    if images[str(image)]:
        raise ValueError(f'{where}: field "image" names {image}, which PIL cannot open ({images[str(image)]}); '
                         "replace the file with a whole PNG or JPEG, or drop the line")


def _row(line: str, where: str, known: set[str], folder: Path, check_answers: bool, images: dict) -> Example:
    try:
        row = json.loads(line, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise ValueError(f'{where}: field "{err}" appears more than once in the line (JSON would silently keep the '
                         "last); keep one of them") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                         f"object such as {_SHAPE}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {_JSON_TYPE.get(type(row), 'string')} where an object was expected; each "
                         f"line must be one object such as {_SHAPE}")
    unknown = sorted(set(row) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {_names(unknown)} (a typo?); the "
                         f"fields are {_names(REQUIRED)} (required) and {_names(OPTIONAL)} (optional); rename it, "
                         "or list it in task.ignore_fields to keep it in the file")
    for key in REQUIRED:
        if key not in row:
            raise ValueError(f'{where}: missing required field "{key}"; every line needs the string fields '
                             f"{_names(REQUIRED)}")
    for key in (*REQUIRED, *OPTIONAL):
        value = row.get(key, "")
        if not isinstance(value, str):
            kind = _JSON_TYPE.get(type(value), type(value).__name__)
            fix = f'quote it: "{key}": "{json.dumps(value)}"' if kind in ("number", "boolean") else "write it as a string"
            raise ValueError(f'{where}: field "{key}" is {"null" if value is None else ("an " if kind[0] in "aeiou" else "a ") + kind}, not a string; {fix}')
    for key in REQUIRED:
        if not row[key].strip():
            raise ValueError(f'{where}: field "{key}" is empty; give it text, or drop the line')
    if check_answers and not answers.gold_parses(row["answer"]):
        raise ValueError(f'{where}: field "answer" ({json.dumps(row["answer"])}) is not an answer math-verify can '
                         "parse, so no response can be scored correct against it (only identical text would); write "
                         'it as a number or LaTeX, e.g. "\\frac{1}{2}", or set task.check_answers=false')
    image = None
    if row.get("image"):  # opened now (once per file), and again when a batch is built (dopd.view)
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else folder / image
        if not image.is_file():
            raise ValueError(f'{where}: field "image" names {image}, which does not exist; paths are relative to the '
                             "JSONL file's folder")
        _check_image(image, where, images)
        image = str(image)
    return Example(question=row["prompt"], hint=row["privileged"], answer=row["answer"].strip(),
                   solution=row.get("solution", ""), domain=row.get("domain") or "default", image=image)


def _check_train_is_not_evaluated(paths: dict[str, Path]) -> None:
    """An evaluation split that is the training file (same path, or a copy) would score memorisation."""
    (train, train_path), *evals = paths.items()
    digest = hashlib.sha256(train_path.read_bytes()).hexdigest()
    for split, p in evals:
        same = "is the same file as" if p.resolve() == train_path.resolve() or p.samefile(train_path) else (
            "has the same content as" if hashlib.sha256(p.read_bytes()).hexdigest() == digest else None)
        if same:
            raise ValueError(f"task.files.{split}: {p} {same} task.files.{train} ({train_path}): evaluating on the "
                             f"training data measures memorisation; point task.files.{split} at held-out data")


@dataclass
class JsonlTask:
    """Splits are the keys of `files`, in order: the first is trained on, the others are evaluated."""

    files: dict[str, str]
    name: str = "jsonl"
    root: str | None = None  # project root: relative paths that do not exist from the cwd are tried there
    ignore_fields: list[str] = field(default_factory=list)  # extra columns to tolerate (ids, metadata)
    max_line_bytes: int = MAX_LINE_BYTES  # a longer line is an error naming file:line
    check_answers: bool = True  # every answer must parse with math-verify (else nothing can score it)
    splits: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        if not isinstance(self.files, Mapping) or len(self.files) < 2:
            raise ValueError(f"task.files must map a training split and at least one evaluation split to JSONL files, "
                             f"e.g. {{train: data/train.jsonl, test: data/test.jsonl}}; got {self.files!r}")
        self.files = {str(s): str(p) for s, p in self.files.items()}  # Hydra hands over a DictConfig
        self.splits = tuple(self.files)
        paths = {s: resolve(p, self.root) for s, p in self.files.items()}
        images: dict = {}
        self.rows = {s: read_jsonl(p, s, tuple(self.ignore_fields), max_line_bytes=int(self.max_line_bytes),
                                   check_answers=bool(self.check_answers), images=images)
                     for s, p in paths.items()}
        _check_train_is_not_evaluated(paths)

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        return seeded_subset(self.name, self.rows, split, n, seed)

    def extract_answer(self, response: str) -> str | None:
        return answers.extract_boxed_or_last(response)

    def is_correct(self, response: str, example: Example) -> bool:
        return answers.is_correct(response, example.answer)
