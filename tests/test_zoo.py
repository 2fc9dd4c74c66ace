"""The shipped pair (zoo/arith) is what its card says: re-measured, the teacher leads by >= 20 points without p."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import dopd
from dopd.models import load_pair
from dopd.sft import evaluate
from dopd.tasks.arith import ArithTask
from dopd.tokenizer import char_tokenizer
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


@pytest.mark.parametrize("name", ["s", "l", "s_d0", "l_d0"])  # the experiments' default pair, table1_d0's pair
def test_reasoning_zoo_matches_its_card(name, tmp_path):
    """Re-measure a published zoo model on its card's held-out questions, without p and with the step-wise p."""
    from transformers import AutoModelForCausalLM

    from dopd.pipeline import build_task
    from tests.conftest import compose_cfg

    torch.set_num_threads(2)
    folder = dopd.PROJECT_ROOT / "zoo" / "reason" / name
    card = json.loads((folder / "card.json").read_text())
    cfg = compose_cfg([f"zoo=reason_{name}"], tmp_path)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)  # the card's task is the config's (keys added since: unset)
    assert {k: v for k, v in task_cfg.items() if k in card["task"] or v is not None} == card["task"]
    task = build_task(cfg.task)
    model = AutoModelForCausalLM.from_pretrained(folder)
    _assert_card_accuracy(model, PrivilegedView(char_tokenizer()), task, cfg, card, form="stepwise")


def _assert_card_accuracy(model, view, task, cfg, card: dict, form: str) -> None:
    """The card's held-out test accuracy without p and with p in `form`, re-measured to within one point."""
    import dataclasses

    from dopd.evaluation import accuracy_table
    from dopd.zoo import sft_data

    _, evals = sft_data(task, cfg)
    measured = accuracy_table(model, view, task, {"test": evals["test"]})
    _, hinted = sft_data(dataclasses.replace(task, hint_form=form), cfg)
    measured.update(accuracy_table(model, view, task, {"test": hinted["test"]}, prefix=f"acc_priv/{form}",
                                   privileged=True))
    for key in ("acc/test", f"acc_priv/{form}/test"):
        assert measured[key] == pytest.approx(card["accuracy"][key], abs=0.01), key


@pytest.mark.parametrize("name", ["s", "l"])  # the VLM pair of Tables 2 and 5
def test_scenes_zoo_matches_its_card(name, tmp_path):
    """Re-measure a published VLM zoo model (Qwen3-VL) on its card's held-out test questions, without p and with
    the default box_label p; the teacher's lead without p is precondition (i)."""
    from transformers import AutoModelForImageTextToText

    from dopd.pipeline import build_task
    from dopd.vision import ImageTextProcessor
    from tests.conftest import compose_cfg

    torch.set_num_threads(2)
    folder = dopd.PROJECT_ROOT / "zoo" / "scenes" / name
    card = json.loads((folder / "card.json").read_text())
    cfg = compose_cfg([f"zoo=scenes_{name}"], tmp_path)
    assert OmegaConf.to_container(cfg.task, resolve=True) == card["task"]
    task = build_task(cfg.task)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    proc = ImageTextProcessor.from_pretrained(folder)
    view = PrivilegedView(proc.tokenizer, plain=cfg.task.view.plain, privileged=cfg.task.view.privileged, processor=proc)
    _assert_card_accuracy(model, view, task, cfg, card, form="box_label")
    if name == "l":
        student = json.loads((folder.parent / "s" / "card.json").read_text())
        assert card["accuracy"]["acc/test"] - student["accuracy"]["acc/test"] >= 0.20
