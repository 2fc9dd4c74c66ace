"""The shipped pair (zoo/arith) is what its card says: re-measured, the teacher leads by >= 20 points without p."""

from __future__ import annotations

import json

import pytest
import torch

import dopd
from dopd.models import load_pair
from dopd.sft import evaluate
from dopd.tasks.arith import ArithTask
from dopd.view import PrivilegedView

ZOO = dopd.PROJECT_ROOT / "zoo" / "arith"


@pytest.fixture(scope="module")
def card():
    return json.loads((ZOO / "card.json").read_text())


def test_shipped_pair_accuracy_matches_its_card(card):
    torch.set_num_threads(2)
    task_kw = {k: card["task"][k] for k in ("n_ops", "max_digits", "max_operand", "ood_extra_ops", "hint_form")}
    task = ArithTask(**task_kw)
    pair = load_pair({"name": "arith-pair", "tokenizer": "zoo/arith/student",
                      "student": {"source": "pretrained", "path": "zoo/arith/student"},
                      "teacher": {"source": "pretrained", "path": "zoo/arith/teacher"}}, root=dopd.PROJECT_ROOT)
    view = PrivilegedView(pair.tokenizer)
    n = card["models"]["teacher"]["eval_n"]
    evals = {"test": task.examples("test", card["task"]["heldout_n"], card["task"]["seed"])[:n]}
    measured = {role: evaluate(model, view, task, evals, n=n) for role, model in (("teacher", pair.teacher),
                                                                                  ("student", pair.student))}
    for role in ("teacher", "student"):
        for key in ("acc/test", "acc_priv/test"):
            assert measured[role][key] == pytest.approx(card["models"][role]["accuracy"][key], abs=0.01), (role, key)
    assert measured["teacher"]["acc/test"] - measured["student"]["acc/test"] >= 0.20


def test_default_config_uses_the_cards_task(card):
    from tests.conftest import compose_cfg

    cfg = compose_cfg([])
    assert cfg.model.name == "arith-pair"
    for key in ("n_ops", "max_digits", "max_operand", "ood_extra_ops", "hint_form"):
        assert cfg.task[key] == card["task"][key], key
    assert cfg.task.view.plain == card["view"]["plain"].encode().decode("unicode_escape")
