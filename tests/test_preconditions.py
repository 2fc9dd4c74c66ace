"""scripts/preconditions.py reads the zoo cards and a sweep; it fails (exit 1) when a precondition is not met."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import mlflow
import pytest
from mlflow.entities import Metric

import dopd

spec = importlib.util.spec_from_file_location("preconditions", dopd.PROJECT_ROOT / "scripts" / "preconditions.py")
preconditions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preconditions)


def test_without_runs_the_run_based_checks_fail(tmp_path, capsys):
    code = preconditions.main(["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--teacher", "l", "--student", "xs"])
    out = capsys.readouterr().out
    assert code == 1
    assert "(i)   without p: teacher 44.9 vs student 4.3" in out and "-> PASS" in out.splitlines()[0]
    assert "no runs yet -> FAIL" in out and "fewer than two finished vanilla runs" in out
    assert "(iii) -> PASS" in out


def test_a_probe_model_by_folder_and_its_runs_by_pair(tmp_path, capsys):
    """--student takes a folder with a card.json; --pair keeps only that pair's runs (another pair's are ignored)."""
    probe = tmp_path / "probe"
    shutil.copytree(dopd.PROJECT_ROOT / "zoo" / "reason" / "s", probe)
    data = json.loads((probe / "card.json").read_text())
    data["accuracy"]["acc/test"] = 0.10  # a weaker probe student: the gap to l (44.9) clears 20 points
    (probe / "card.json").write_text(json.dumps(data))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("probe", artifact_location=str(tmp_path / "art"))
    t0 = int(time.time() * 1000)
    for pair, gains in (("probe-pair", (0.05, 0.06, 0.07)), ("other-pair", (-0.3, 0.3, 0.0))):
        for seed, gain in enumerate(gains, 1):
            run = client.create_run(exp, run_name=f"vanilla-seed{seed}", tags={"router": "vanilla", "pair": pair})
            client.log_batch(run.info.run_id, metrics=[Metric("eval/acc/avg", 0.2, t0, 0),
                                                       Metric("eval/acc/avg", 0.2 + gain, t0, 200)])
            client.set_terminated(run.info.run_id)
        run = client.create_run(exp, run_name="dopd-seed1", tags={"router": "dopd", "pair": pair})
        client.log_batch(run.info.run_id, metrics=[Metric("train/regime/HT/frac", 0.12 if pair == "probe-pair" else 0.0,
                                                          t0, 1)])
        client.set_terminated(run.info.run_id)

    args = ["--tracking-uri", uri, "--student", str(probe), "--experiment", "probe"]
    code = preconditions.main(args + ["--pair", "probe-pair"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert out[0].startswith("(i)   without p: teacher 44.9 vs student 10.0") and out[0].endswith("PASS")
    assert "HT share at the first step of 1 dopd runs in 'probe': 12.0% -> PASS" in out[1]
    assert out[-1] == "(iv)  vanilla gain over 3 seeds: +6.0 ± 1.0 points -> PASS"
    assert preconditions.main(args) == 1  # both pairs' runs: HT 6.0%, and the other pair's spread fails (iv)
    with pytest.raises(SystemExit, match="no card.json for model 'nope'"):
        preconditions.main(["--student", "nope"])
