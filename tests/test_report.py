"""dopd.report on a hand-made MLflow store with known numbers, and once on a real (tiny) train.py sweep."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.entities import Metric, Param, RunTag

from dopd import PROJECT_ROOT
from dopd.report import (ReportError, RunData, band, build_table, group_runs, load_run, main, moving_average, report,
                         run_value, select_runs, sensitivity_points, summarize, sweep_overrides, t975)
from tests.conftest import FAST

T2 = 4.302652729911275    # t_{0.975, df=2}
T1 = 12.706204736174704   # t_{0.975, df=1}
START = {"test": 0.40, "ood": 0.04, "avg": 0.22}   # the untrained student, the same for every run
TEACHER = {"test": 0.90, "ood": 0.10}              # ref/teacher/acc/*, no avg: the report averages the splits
FINAL = {  # router -> per-seed final (test, ood); avg = their mean
    "vanilla": [(0.50, 0.10), (0.54, 0.12), (0.52, 0.14)],
    "teacher_priv": [(0.55, 0.05), (0.57, 0.05), (0.56, 0.05)],
    "dopd": [(0.60, 0.20), (0.64, 0.22)],
}


def _child(client, exp, parent_id, router, seed, final, status="FINISHED", start=START, error=None):
    t0 = int(time.time() * 1000)
    run = client.create_run(exp, run_name=f"{router}-seed{seed}", start_time=t0,
                            tags={"router": router, "seed": str(seed), "task": "arith", "pair": "arith-pair",
                                  **({"mlflow.parentRunId": parent_id} if parent_id else {})})
    rid = run.info.run_id
    metrics = [Metric(f"eval/acc/{k}", v, t0, 0) for k, v in start.items()]
    metrics += [Metric(f"ref/teacher/acc/{k}", v, t0, 0) for k, v in TEACHER.items()]
    metrics += [Metric("train/entropy", 1.0 - 0.05 * s + 0.01 * seed, t0 + s, s) for s in range(10)]
    if final is not None:
        test, ood = final
        for step, frac in ((5, 0.5), (10, 1.0)):
            for k, v in (("test", test), ("ood", ood), ("avg", (test + ood) / 2)):
                metrics.append(Metric(f"eval/acc/{k}", START[k] + frac * (v - START[k]), t0 + step, step))
    tags = [RunTag("error", error)] if error else []
    params = [Param("router/name", router), Param("seed", str(seed)), Param("task/hint_form", "stepwise")]
    client.log_batch(rid, metrics=metrics, params=params, tags=tags)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """table1: an older sweep (one vanilla run at 90%) and the newest sweep (vanilla, teacher_priv, dopd x seeds,
    one FAILED and one still RUNNING dopd child); single_jobs: two runs without a parent."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("table1", artifact_location=str(root / "mlartifacts"))
    old = client.create_run(exp, run_name="sweep-old", start_time=int(time.time() * 1000) - 60_000,
                            tags={"sweep": "true", "overrides": "router=vanilla seed=1,2"})
    _child(client, exp, old.info.run_id, "vanilla", 1, (0.9, 0.9))
    client.set_terminated(old.info.run_id)
    parent = client.create_run(exp, run_name="sweep-new", tags={
        "sweep": "true", "overrides": "router=vanilla,teacher_priv,dopd seed=1,2,3 trainer.max_steps=10"})
    pid = parent.info.run_id
    for router, finals in FINAL.items():
        for seed, final in enumerate(finals, 1):
            _child(client, exp, pid, router, seed, final)
    _child(client, exp, pid, "dopd", 3, None, status="FAILED", start={"test": 0.99, "ood": 0.99, "avg": 0.99},
           error="RuntimeError: boom")
    _child(client, exp, pid, "dopd", 4, None, status="RUNNING")
    client.set_terminated(pid, "FAILED")
    single = client.create_experiment("single_jobs", artifact_location=str(root / "single"))
    for router in ("vanilla", "dopd"):
        _child(client, single, None, router, 1, (0.5, 0.1))
    return uri, pid, root


def test_summarize_and_t_quantiles(monkeypatch):
    s = summarize([50.0, 54.0, 52.0])
    assert (s.mean, s.std, s.n) == (52.0, 2.0, 3) and s.ci95 == pytest.approx(T2 * 2 / math.sqrt(3))
    one = summarize([41.0, float("nan"), None])
    assert one.n == 1 and one.mean == 41.0 and math.isnan(one.std) and math.isnan(one.ci95)
    assert moving_average([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 5) == pytest.approx([0, 1, 2, 3, 4, 5])  # trends kept
    assert moving_average([0.0, 9.0, 0.0, 9.0, 0.0], 3) == pytest.approx([0, 3, 6, 3, 0])
    steps, mean, std = band([[(0, 1.0), (1, 3.0)], [(0, 3.0), (2, 5.0)]])
    assert (steps, mean, std) == ([0, 1, 2], [2.0, 3.0, 5.0], [1.0, 0.0, 0.0])
    scipy_values = {df: t975(df) for df in (1, 2, 9, 30, 200)}
    assert scipy_values[2] == pytest.approx(T2)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the fallback table, as without scipy
    for df, value in scipy_values.items():
        assert t975(df) == pytest.approx(value, abs=0.03)
    assert t975(45) >= scipy_values[30] - 0.03 and t975(45) > 2.0  # between table entries: the wider one


def test_rows_follow_the_swept_keys_and_vanilla_matches_per_key():
    swept = sweep_overrides("router=vanilla,dopd seed=1,2,3 task.hint_form=b,a hydra/launcher=joblib data.n_eval=8")
    assert swept == {"router": ["vanilla", "dopd"], "seed": ["1", "2", "3"], "task.hint_form": ["b", "a"]}
    runs = []
    for router, hint, acc in (("dopd", "a", 0.6), ("vanilla", "a", 0.5), ("dopd", "b", 0.7), ("vanilla", "b", 0.4)):
        for seed in (1, 2):
            runs.append(RunData(f"{router}-{hint}-{seed}", "x", {"router": router, "pair": "p"},
                                {"task/hint_form": hint, "router/name": router}, {"eval/acc/avg": acc}))
    groups = group_runs(runs, ["router", "task.hint_form"], swept)
    assert [g.label for g in groups] == ["vanilla, hint_form=b", "vanilla, hint_form=a", "dopd, hint_form=b",
                                         "dopd, hint_form=a"]
    table = build_table(groups, ["Avg"], "t")
    assert table.row("dopd, hint_form=b").extra["Δ vs vanilla"] == pytest.approx(30.0)  # vs vanilla with hint b
    assert table.row("dopd, hint_form=a").extra["Δ vs vanilla"] == pytest.approx(10.0)
    assert "Δ vs vanilla" not in table.row("vanilla, hint_form=a").extra
    assert "gain" not in table.row("dopd, hint_form=a").extra  # no step-0 values: no reference rows
    assert [g.label for g in group_runs(runs, ["task.hint_form"])] == ["a", "b"]


def test_several_pairs_get_their_own_reference_rows():
    """Table 3: rows (model, router); gain and gap recovery against each pair's own student and teacher."""
    runs = []
    for pair, start, teacher in (("8b-0.6b", 0.20, 0.60), ("4b-1.7b", 0.40, 0.50)):
        for router, final in (("vanilla", start + 0.05), ("dopd", start + 0.10)):
            runs.append(RunData(f"{pair}-{router}", "x", {"router": router, "pair": pair}, {"model/name": pair},
                                {"eval/acc/avg": final, "ref/teacher/acc/avg": teacher},
                                start={"eval/acc/avg": start}))
    groups = group_runs(runs, ["model", "router"], {"model": ["8b-0.6b", "4b-1.7b"], "router": ["vanilla", "dopd"]})
    table = build_table(groups, ["Avg"], "t3")
    assert [r.label for r in table.rows] == [
        "teacher (8b-0.6b)", "student (start) (8b-0.6b)", "Δ gap (8b-0.6b)", "teacher (4b-1.7b)",
        "student (start) (4b-1.7b)", "Δ gap (4b-1.7b)", "model=8b-0.6b, vanilla", "model=8b-0.6b, dopd",
        "model=4b-1.7b, vanilla", "model=4b-1.7b, dopd"]
    assert table.row("model=8b-0.6b, dopd").extra == pytest.approx(
        {"Δ vs vanilla": 5.0, "gain": 10.0, "gap recovered %": 25.0})
    assert table.row("model=4b-1.7b, dopd").extra == pytest.approx(
        {"Δ vs vanilla": 5.0, "gain": 10.0, "gap recovered %": 100.0})


def test_report_on_a_handmade_sweep(store, tmp_path):
    uri, pid, _ = store
    rep = report("table1", uri, out=tmp_path / "rep")
    table = rep.tables[0]
    assert table.columns == ["test", "ood", "Avg"]
    assert [r.label for r in table.rows] == ["teacher", "student (start)", "Δ gap", "vanilla", "teacher_priv", "dopd"]

    van, tp, dopd = table.row("vanilla"), table.row("teacher_priv"), table.row("dopd")
    assert (van.n, tp.n, dopd.n) == (3, 3, 2)  # the FAILED and the RUNNING dopd children are left out
    assert van.cells["test"].mean == pytest.approx(52.0) and van.cells["test"].std == pytest.approx(2.0)
    assert van.cells["test"].ci95 == pytest.approx(T2 * 2.0 / math.sqrt(3))
    assert van.cells["Avg"].mean == pytest.approx(32.0) and van.cells["Avg"].std == pytest.approx(math.sqrt(3))
    assert dopd.cells["test"].mean == pytest.approx(62.0) and dopd.cells["test"].n == 2
    assert dopd.cells["test"].std == pytest.approx(math.sqrt(8)) and dopd.cells["test"].ci95 == pytest.approx(T1 * 2)
    assert dopd.cells["Avg"].mean == pytest.approx(41.5) and tp.cells["Avg"].mean == pytest.approx(30.5)

    assert dopd.marks == {"test": "best", "ood": "best", "Avg": "best"}
    assert tp.marks == {"test": "second"} and van.marks == {"ood": "second", "Avg": "second"}

    teacher, start, gap = table.row("teacher"), table.row("student (start)"), table.row("Δ gap")
    assert {c: s.mean for c, s in teacher.cells.items()} == pytest.approx({"test": 90.0, "ood": 10.0, "Avg": 50.0})
    assert {c: s.mean for c, s in start.cells.items()} == pytest.approx({"test": 40.0, "ood": 4.0, "Avg": 22.0})
    assert {c: s.mean for c, s in gap.cells.items()} == pytest.approx({"test": 50.0, "ood": 6.0, "Avg": 28.0})
    assert not teacher.marks and not start.marks  # references are not ranked, as in the paper

    assert table.extras == ["Δ vs vanilla", "gain", "gap recovered %"]
    assert dopd.extra == pytest.approx({"Δ vs vanilla": 9.5, "gain": 19.5, "gap recovered %": 100 * 19.5 / 28})
    assert tp.extra["Δ vs vanilla"] == pytest.approx(-1.5)
    assert van.extra == pytest.approx({"gain": 10.0, "gap recovered %": 100 * 10 / 28})

    md = rep.markdown
    assert "| dopd | 2 | **62.0 ± 2.8** | **21.0 ± 1.4** | **41.5 ± 2.1** | +9.5 | +19.5 | 69.6 |" in md
    assert "| teacher_priv | 3 | <u>56.0 ± 1.0</u> | 5.0 ± 0.0 | 30.5 ± 0.5 | -1.5 | +8.5 | 30.4 |" in md
    assert "| Δ gap |  | +50.0 | +6.0 | +28.0 |" in md
    assert "Skipped 2 unfinished or failed run(s)" in md
    assert "dopd-seed3 (FAILED: RuntimeError: boom)" in md and "dopd-seed4 (RUNNING)" in md
    assert rep.skipped and "sweep-new" in md

    names = sorted(p.name for p in rep.files)
    assert names == ["curve_eval_acc_avg.png", "curve_train_entropy.png", "report.csv", "report.md", "report.tex"]
    assert all(p.exists() and p.stat().st_size > 0 for p in rep.files)
    tex = (tmp_path / "rep" / "report.tex").read_text()
    assert "teacher\\_priv & 3 & \\underline{56.0 $\\pm$ 1.0} & 5.0 $\\pm$ 0.0 & 30.5 $\\pm$ 0.5 & $-$1.5 &" in tex
    assert r"\textbf{62.0 $\pm$ 2.8}" in tex and r"\underline{56.0 $\pm$ 1.0}" in tex and r"$\Delta$ gap" in tex
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    assert float(rows["vanilla", "test"]["ci95_low"]) == pytest.approx(52.0 - T2 * 2 / math.sqrt(3))
    assert rows["vanilla", "test"]["n"] == "3" and rows["dopd", "test"]["values"] == "60;64"
    assert float(rows["dopd", "gap recovered %"]["mean"]) == pytest.approx(100 * 19.5 / 28)

    client = mlflow.MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(pid, "report")}
    assert rep.logged and logged == {f"report/{n}" for n in names}


def test_picking_another_sweep_or_all_runs(store, tmp_path):
    uri, _, _ = store
    old = report("table1", uri, sweep="sweep-old", out=tmp_path / "old", log=False, curves=())
    (row,) = [r for r in old.tables[0].rows if r.kind == "method"]
    assert row.label == "vanilla" and row.n == 1 and row.cells["test"].mean == pytest.approx(90.0)
    assert math.isnan(row.cells["test"].std) and "| vanilla | 90.0 |" in old.markdown  # one seed: no ± and no n
    everything = report("table1", uri, all_runs=True, out=tmp_path / "all", log=False, curves=())
    assert everything.tables[0].row("vanilla").n == 4 and not everything.logged
    single = report("single_jobs", uri, all_runs=True, out=tmp_path / "single", curves=())
    assert [r.label for r in single.tables[0].rows if r.kind == "method"] == ["vanilla", "dopd"]
    seed1 = report("table1", uri, all_runs=True, where={"seed": "1"}, out=tmp_path / "seed1", log=False, curves=())
    assert {r.label: r.n for r in seed1.tables[0].rows if r.kind == "method"} == {"vanilla": 2, "teacher_priv": 1,
                                                                                    "dopd": 1}
    assert "with seed=1 in 3 row(s)" in seed1.markdown
    with pytest.raises(ReportError, match=r"--where task.hint_form=none: no finished run has it; values of "
                                          r"task.hint_form: stepwise"):
        report("table1", uri, all_runs=True, where={"task.hint_form": "none"}, out=tmp_path / "none", log=False)
    assert main(["table1", "--tracking-uri", uri, "--all", "--where", "seed=2", "--where", "router=dopd", "--no-log",
                 "--curves", "", "--out", str(tmp_path / "cli")]) == 0
    assert "| dopd | 64.0 | 22.0 | 43.0 |" in (tmp_path / "cli" / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["table1", "--tracking-uri", uri, "--where", "seed"])


def test_clear_errors(store, tmp_path, capsys):
    uri, _, root = store
    with pytest.raises(ReportError, match=r"no experiment 'nope'.*existing: .*single_jobs, table1"):
        report("nope", uri, out=tmp_path)
    with pytest.raises(ReportError, match=r"no sweep parent run .*--all.*--parent RUN_ID"):
        report("single_jobs", uri, out=tmp_path)
    with pytest.raises(ReportError, match="no MLflow database"):
        report("table1", f"sqlite:///{root}/missing.db", out=tmp_path)
    with pytest.raises(ReportError, match="not a row; rows: vanilla, teacher_priv, dopd"):
        report("table1", uri, baseline="nope", out=tmp_path, log=False)
    assert main(["nope", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    assert "existing: Default, single_jobs, table1" in capsys.readouterr().err


def test_cli_with_the_papers_numbers(store, tmp_path):
    uri, _, _ = store
    paper = tmp_path / "paper.yaml"
    paper.write_text("Teacher (Qwen3-8B): {C-Eval: 77.1, LiveBench: 53.5, Avg: 52.8}\n"
                     "Vanilla OPD: {C-Eval: 65.2, LiveBench: 40.9, Avg: 43.9}\n"
                     "OPCD: {C-Eval: 66.1, LiveBench: 41.6, Avg: 44.3}\n"
                     "DOPD: {C-Eval: 71.3, LiveBench: 49.8, Avg: 51.4}\n")
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "dopd.report", "table1", "--tracking-uri", uri, "--out", str(out),
                          "--paper", str(paper), "--no-log", "--curves", "eval/acc/test"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| dopd | 2 | **62.0 ± 2.8** |" in res.stdout
    assert "Paper's published numbers (paper, GPU scale" in res.stdout
    assert "| DOPD | **71.3** | **49.8** | **51.4** |" in res.stdout
    assert "| Teacher (Qwen3-8B) | 77.1 | 53.5 | 52.8 |" in res.stdout and "<u>66.1</u>" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["curve_eval_acc_test.png", "report.csv", "report.md",
                                                      "report.tex"]


@pytest.mark.slow
def test_report_on_a_real_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "-m", "router=vanilla,dopd", "seed=1,2", *FAST, "eval.routing_samples=0",
           "logger.experiment=report_test", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = report("report_test", uri, out=tmp_path / "rep")
    table = rep.tables[0]
    methods = [r for r in table.rows if r.kind == "method"]
    assert [r.label for r in methods] == ["vanilla", "dopd"] and all(r.n == 2 for r in methods)
    assert table.columns[-1] == "Avg" and {"test", "ood"} <= set(table.columns)
    assert table.row("student (start)").n == 4 and "gain" in table.extras
    assert {p.name for p in rep.files} >= {"report.md", "curve_eval_acc_avg.png", "curve_train_entropy.png"}
    client = mlflow.MlflowClient(uri)
    assert len(client.list_artifacts(rep.parent_id, "report")) == len(rep.files)


@pytest.mark.slow
def test_an_ablation_sweep_gets_one_row_per_ablation(tmp_path):
    """`ablation` is a config group the resolved config does not name: runs are tagged with the chosen file, and the
    report groups by it (Fig. 4, Tables 6 and 8 are ablation sweeps)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "-m", "ablation=fig4_none,fig4_high_gap", "seed=1", *FAST,
           "eval.routing_samples=0", "logger.experiment=ablation_test", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ablation_test").experiment_id])
    assert sorted(r.data.tags.get("ablation") for r in runs if "mlflow.parentRunId" in r.data.tags) == \
        ["fig4_high_gap", "fig4_none"]
    rep = report("ablation_test", uri, out=tmp_path / "rep")
    assert [r.label for r in rep.tables[0].rows if r.kind == "method"] == ["fig4_none", "fig4_high_gap"]


def test_runs_logged_before_groups_were_tagged_are_grouped_by_their_names():
    run = RunData("vanilla-seed2-ablation=fig4_random", "x", {"router": "vanilla"}, {}, {})
    assert run_value(run, "ablation") == "fig4_random" and run_value(run, "task.hint_form") == "<missing>"


def test_a_sweep_over_two_numeric_keys_gets_a_sensitivity_plot(tmp_path):
    """Fig. 10's layout: Avg against the first swept key, one series per value of the second, CIs over seeds."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fig10", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, run_name="sens", tags={
        "sweep": "true", "overrides": "router.beta_light=0.2,0.6 router.beta_weak=0.1,0.3 seed=1,2"})
    t0 = int(time.time() * 1000)
    final = {}  # (beta_light, beta_weak) -> per-seed final avg
    for light in ("0.2", "0.6"):
        for weak in ("0.1", "0.3"):
            for seed in (1, 2):
                value = float(light) + float(weak) / 10 + 0.01 * seed
                final.setdefault((light, weak), []).append(value)
                run = client.create_run(exp, run_name=f"dopd-seed{seed}", start_time=t0, tags={
                    "router": "dopd", "seed": str(seed), "pair": "p", "mlflow.parentRunId": parent.info.run_id})
                client.log_batch(run.info.run_id, metrics=[Metric("eval/acc/avg", 0.1, t0, 0),
                                                           Metric("eval/acc/avg", value, t0, 10)],
                                 params=[Param("router/beta_light", light), Param("router/beta_weak", weak)])
                client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)

    rep = report("fig10", uri, out=tmp_path / "rep", curves=())
    assert "sensitivity.png" in {p.name for p in rep.files}
    runs = [load_run(client, r, ()) for r in select_runs(client, "fig10", parent.info.run_id)[1]]
    keys = ["router.beta_light", "router.beta_weak"]
    points = sensitivity_points(group_runs(runs, keys), rep.tables[0], keys, "Avg")
    assert list(points) == ["router.beta_weak=0.1", "router.beta_weak=0.3"]
    for weak in ("0.1", "0.3"):
        xs = [x for x, _ in points[f"router.beta_weak={weak}"]]
        means = [s.mean for _, s in points[f"router.beta_weak={weak}"]]
        assert xs == [0.2, 0.6]
        assert means == pytest.approx([100 * sum(final[light, weak]) / 2 for light in ("0.2", "0.6")])
    # a sweep over methods (non-numeric rows) gets none
    assert sensitivity_points(group_runs(runs, ["router"]), rep.tables[0], ["router"], "Avg") is None
