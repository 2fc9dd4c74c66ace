"""scripts/preconditions.py reads the zoo cards and a sweep; it fails (exit 1) when a precondition is not met."""

from __future__ import annotations

import importlib.util

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
