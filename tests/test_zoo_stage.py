"""`python train.py zoo=...` (stage=sft): trains a model, logs it to MLflow, caches it by config hash, publishes it."""

from __future__ import annotations

import json

import mlflow

from dopd.models import load_pair
from dopd.pipeline import run
from tests.conftest import compose_cfg

TINY = ["zoo=reason_s", "sft.steps=6", "sft.eval_every=3", "sft.eval_n=6", "sft.n_train=200", "sft.heldout_n=12",
        "sft.arch.hidden_size=16", "sft.arch.num_hidden_layers=1"]


def test_sft_stage_builds_logs_caches_and_publishes(tmp_path, tracking_uri):
    publish = tmp_path / "published"
    overrides = [*TINY, f"logger.tracking_uri={tracking_uri}", f"sft.publish={publish}"]
    run(compose_cfg(overrides, tmp_path))
    (folder,) = (tmp_path / "zoo").iterdir()
    card = json.loads((folder / "card.json").read_text())
    assert folder.name == f"reason-s-{card['key']}"
    acc = card["accuracy"]
    for key in ("acc/test", "acc/ood", "acc/avg", "acc/test/vars", "acc_priv/stepwise/test", "acc_priv/none/ood",
                "acc_priv/answer/test/funcs"):
        assert 0.0 <= acc[key] <= 1.0, key
    assert card["task"]["hint_form"] == "mixed" and card["arch"]["hidden_size"] == 16

    client = mlflow.MlflowClient(tracking_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name == "sft-reason-s" and r.data.tags["stage"] == "sft"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "sft/loss")] == [3, 6]
    assert r.data.metrics["acc_priv/stepwise/test"] == acc["acc_priv/stepwise/test"]

    mtime = (folder / "card.json").stat().st_mtime
    run(compose_cfg(overrides, tmp_path))  # same config: the cache answers, nothing is retrained or logged
    assert (folder / "card.json").stat().st_mtime == mtime
    assert len(client.search_runs([client.get_experiment_by_name("zoo").experiment_id])) == 1
    run(compose_cfg([*overrides, "sft.steps=7"], tmp_path))  # another config: another model
    assert len(list((tmp_path / "zoo").iterdir())) == 2

    pair = load_pair({"name": "p", "tokenizer": str(publish), "student": {"path": str(publish)},
                      "teacher": {"path": str(folder)}})
    assert pair.student.config.hidden_size == 16
