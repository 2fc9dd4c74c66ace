"""scripts/regime_anatomy.py: the reasoning task's token kinds, the tally, and one run on the zoo pair."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import dopd
from dopd.routing import Gap
from dopd.tasks.reason import ReasonTask

spec = importlib.util.spec_from_file_location("regime_anatomy", dopd.PROJECT_ROOT / "scripts" / "regime_anatomy.py")
anatomy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anatomy)


def test_token_kinds_of_a_reasoning_response():
    text = "18+12=30;30*3=90;#90"
    kinds = ReasonTask.token_kinds([*text, ""])  # the EOS piece decodes to ""
    assert "".join(ch for ch, k in zip(text, kinds) if k == "plan") == "18+12*3"
    assert "".join(ch for ch, k in zip(text, kinds) if k == "result") == "3090"
    assert "".join(ch for ch, k in zip(text, kinds) if k == "copy") == "30"
    assert "".join(ch for ch, k in zip(text, kinds) if k == "answer") == "90"
    assert kinds[-1] == "format" and kinds.count("format") == 6


def test_tally_counts_masked_tokens_by_regime_kind_and_rightness():
    regime = torch.tensor([[2, 3, 0], [1, 0, -1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    right = torch.tensor([[True, False, True], [True, True, True]])
    gap = Gap(log_q_teacher=torch.log(torch.tensor([[0.9, 0.01, 1.0], [0.1, 1.0, 1.0]])),
              log_q_student=torch.log(torch.tensor([[0.3, 0.5, 1.0], [0.1, 1.0, 1.0]])))
    kinds = [["result", "result", "format"], ["plan", "plan", "plan"]]
    counts, stats = anatomy.tally(regime, kinds, right, gap, mask)
    assert counts == {("HT", "result", "right"): 1, ("HS", "result", "wrong"): 1, ("LH", "format", "right"): 1,
                      ("LL", "plan", "right"): 1, ("LH", "plan", "right"): 1}
    out = anatomy.summarise(counts, stats)
    assert out["tokens"] == 5 and out["regimes"]["HT"]["by_kind"] == {"result/right": 0.2}
    assert sum(r["share"] for r in out["regimes"].values()) == pytest.approx(1.0)
    a, q_s, q_t = stats[("result", "right")][0]
    assert a == pytest.approx(abs(torch.log(torch.tensor(3.0)).item()), rel=1e-5)
    assert (q_s, q_t) == pytest.approx((0.3, 0.9))


def test_one_run_on_the_zoo_pair(tmp_path, capsys):
    out = tmp_path / "anatomy.json"
    assert anatomy.main(["--prompts", "4", "--json", str(out), "rollout.n=2", "data.batch_size=4"]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] > 0 and set(result["regimes"]) == {"LH", "LL", "HT", "HS"}
    assert sum(r["share"] for r in result["regimes"].values()) == pytest.approx(1.0)
    assert {k.split("/")[0] for k in result["kinds"]} <= {"plan", "result", "copy", "answer", "format"}
    assert "HT" in capsys.readouterr().out
