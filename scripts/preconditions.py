"""The testbed's preconditions (issue: privilege-illusion testbed), measured before any comparison of routers.

    python scripts/preconditions.py                       # zoo/reason/{l,s} cards + MLflow experiment table1
    python scripts/preconditions.py --teacher xl --student s --experiment table3
    python scripts/preconditions.py --zoo scenes          # the VLM testbed: zoo/scenes/{l,s} + experiment table2
    python scripts/preconditions.py --student /tmp/probe/s800 --experiment testbed_probe --pair reason-l-s800
                                                          # a probe: its model's folder, its runs by pair

(i)   without p, the teacher beats the student by >= 20 points held-out (zoo cards);
(ii)  p helps both, and at the start of a DOPD run >= 10% of response tokens are HT (the first logged step of the
      experiment's dopd runs: train/regime/HT/frac);
(iii) the teacher uses each hint form: its accuracy with p differs from without by more than two standard errors;
(iv)  vanilla OPD raises the student by more than twice the seed spread (final minus step-0 eval/acc/avg).
Prints each check with its numbers and PASS/FAIL; a testbed that fails them cannot test the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parent.parent


DEFAULTS = {"reason": ("stepwise", "table1"), "scenes": ("box_label", "table2")}  # the default p form, experiment


def card(name: str, zoo: str = "reason") -> dict:
    """A zoo model's card: `name` is a zoo name (zoo/<zoo>/<name>/) or a folder with a card.json (a probe's model)."""
    folder = Path(name) if Path(name, "card.json").is_file() else ROOT / "zoo" / zoo / name
    if not (folder / "card.json").is_file():
        raise SystemExit(f"preconditions: no card.json for model {name!r}: neither zoo/{zoo}/{name}/ nor a folder "
                         "with a card.json (build it with `python train.py zoo=...`)")
    return json.loads((folder / "card.json").read_text())


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-4) / n)


def runs_of(uri: str, experiment: str, router: str, pair: str | None = None):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    query = f"tags.router = '{router}' and attributes.status = 'FINISHED'"
    if pair:
        query += f" and tags.pair = '{pair}'"
    found = client.search_runs([exp.experiment_id], query)
    return client, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="l", help="zoo name, or a folder with a card.json")
    ap.add_argument("--student", default="s", help="zoo name, or a folder with a card.json")
    ap.add_argument("--zoo", default="reason", choices=sorted(DEFAULTS), help="which testbed's zoo (zoo/<name>/)")
    ap.add_argument("--form", default=None, help="the default p form (stepwise for reason, box_label for scenes)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment with vanilla and dopd runs (table1 / table2)")
    ap.add_argument("--pair", default=None, help="only the runs of this pair (their `pair` tag, the model's name)")
    ap.add_argument("--tracking-uri", default=f"sqlite:///{ROOT}/outputs/mlflow.db")
    args = ap.parse_args(argv)
    form = args.form or DEFAULTS[args.zoo][0]
    args.experiment = args.experiment or DEFAULTS[args.zoo][1]
    teacher_card = card(args.teacher, args.zoo)
    t, s, n = teacher_card["accuracy"], card(args.student, args.zoo)["accuracy"], teacher_card["eval_n"]
    ok = {}
    gap = t["acc/test"] - s["acc/test"]
    ok["i"] = gap >= 0.20
    print(f"(i)   without p: teacher {100 * t['acc/test']:.1f} vs student {100 * s['acc/test']:.1f} (held-out test): "
          f"gap {100 * gap:+.1f} points -> {'PASS' if ok['i'] else 'FAIL'}")
    helps = {who: a[f"acc_priv/{form}/test"] - a["acc/test"] for who, a in (("teacher", t), ("student", s))}
    with_p_gap = t[f"acc_priv/{form}/test"] - s[f"acc_priv/{form}/test"]
    client, dopd = runs_of(args.tracking_uri, args.experiment, "dopd", args.pair)
    ht = [h[0].value for r in dopd if (h := sorted(client.get_metric_history(r.info.run_id, "train/regime/HT/frac"),
                                                   key=lambda m: m.step))]
    ok["ii"] = min(helps.values()) > 0 and bool(ht) and statistics.mean(ht) >= 0.10
    print(f"(ii)  {form} p helps the teacher by {100 * helps['teacher']:+.1f} and the student by "
          f"{100 * helps['student']:+.1f}; with p the teacher still leads by {100 * with_p_gap:+.1f}; HT share at the "
          f"first step of {len(ht)} dopd runs in '{args.experiment}': "
          + (f"{100 * statistics.mean(ht):.1f}%" if ht else "no runs yet") + f" -> {'PASS' if ok['ii'] else 'FAIL'}")
    forms = sorted({k.split("/")[1] for k in t if k.startswith("acc_priv/")})
    used = []
    for form in forms:
        d = t[f"acc_priv/{form}/test"] - t["acc/test"]
        sig = abs(d) > 2 * math.hypot(se(t["acc/test"], n), se(t[f"acc_priv/{form}/test"], n))
        used.append(sig or form == "none")
        print(f"(iii) teacher with p={form:13s} {100 * t[f'acc_priv/{form}/test']:5.1f} vs without {100 * t['acc/test']:5.1f}"
              f" ({100 * d:+.1f}){'' if form != 'none' else ' (control: should not differ)'}")
    ok["iii"] = all(used)
    print(f"(iii) -> {'PASS' if ok['iii'] else 'FAIL'}")
    _, vanilla = runs_of(args.tracking_uri, args.experiment, "vanilla", args.pair)
    gains = []
    for r in vanilla:
        h = sorted(client.get_metric_history(r.info.run_id, "eval/acc/avg"), key=lambda m: m.step)
        if h:
            gains.append(h[-1].value - h[0].value)
    if len(gains) >= 2:
        mean, sd = statistics.mean(gains), statistics.stdev(gains)
        ok["iv"] = mean > 2 * sd and mean > 0
        print(f"(iv)  vanilla gain over {len(gains)} seeds: {100 * mean:+.1f} ± {100 * sd:.1f} points -> "
              f"{'PASS' if ok['iv'] else 'FAIL'}")
    else:
        ok["iv"] = False
        print(f"(iv)  fewer than two finished vanilla runs in '{args.experiment}' -> FAIL (run it first)")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
