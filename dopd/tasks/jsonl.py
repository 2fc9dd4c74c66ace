"""Your own data: one JSONL file per split, each line a prompt with its privileged text and checkable answer.

    {"prompt": "What is 2+3*4?", "privileged": "Multiply first.", "answer": "14", "domain": "math"}

Required: `prompt` (x), `privileged` (p), `answer` (checked with math-verify, see dopd/answers.py). Optional:
`domain`, `solution` (a reference response, only used by SFT), `image` (a file, relative to the JSONL file's
folder: x's image, for vision-language pairs; `task=jsonl_vision`). Every file is read and validated when the task
is built, before any model is loaded, so a typo costs seconds, not a model load: the error names file:line,
the field and the fix.
"""

from __future__ import annotations

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


def read_jsonl(path: Path, split: str, ignore_fields: tuple[str, ...] = ()) -> list[Example]:
    """Parse and validate one file; raise at the first bad line with `file:line: what; how to fix`.

    Messages quote with double quotes only, so they stay readable when Hydra shows them as a repr.
    """
    if not path.is_file():
        raise FileNotFoundError(f"task.files.{split}: {path} does not exist (relative paths are tried from the working "
                                "directory, then the project root); fix the path or remove the split")
    known = set(REQUIRED) | set(OPTIONAL) | set(ignore_fields)
    rows: list[Example] = []
    with path.open(encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():  # blank lines (a trailing newline, a separator) carry nothing
                    rows.append(_row(line.rstrip("\r\n"), f"{path}:{lineno}", known, path.parent))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason}); save the file as UTF-8 JSON lines") from None
    if not rows:
        raise ValueError(f"task.files.{split}: {path} is empty (no JSON lines); write one object per line, "
                         f"{_SHAPE}, or point task.files.{split} at another file")
    return rows


def _row(line: str, where: str, known: set[str], folder: Path) -> Example:
    try:
        row = json.loads(line)
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
    image = None
    if row.get("image"):  # checked now, opened when a batch is built (dopd.view)
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else folder / image
        if not image.is_file():
            raise ValueError(f'{where}: field "image" names {image}, which does not exist; paths are relative to the '
                             "JSONL file's folder")
        image = str(image)
    return Example(question=row["prompt"], hint=row["privileged"], answer=row["answer"].strip(),
                   solution=row.get("solution", ""), domain=row.get("domain") or "default", image=image)


@dataclass
class JsonlTask:
    """Splits are the keys of `files`, in order: the first is trained on, the others are evaluated."""

    files: dict[str, str]
    name: str = "jsonl"
    root: str | None = None  # project root: relative paths that do not exist from the cwd are tried there
    ignore_fields: list[str] = field(default_factory=list)  # extra columns to tolerate (ids, metadata)
    splits: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        if not isinstance(self.files, Mapping) or len(self.files) < 2:
            raise ValueError(f"task.files must map a training split and at least one evaluation split to JSONL files, "
                             f"e.g. {{train: data/train.jsonl, test: data/test.jsonl}}; got {self.files!r}")
        self.files = {str(s): str(p) for s, p in self.files.items()}  # Hydra hands over a DictConfig
        self.splits = tuple(self.files)
        self.rows = {s: read_jsonl(resolve(p, self.root), s, tuple(self.ignore_fields))
                     for s, p in self.files.items()}

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        return seeded_subset(self.name, self.rows, split, n, seed)

    def extract_answer(self, response: str) -> str | None:
        return answers.extract_boxed_or_last(response)

    def is_correct(self, response: str, example: Example) -> bool:
        return answers.is_correct(response, example.answer)
