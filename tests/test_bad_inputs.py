"""Bad input gets a clear error that says what, where and how to fix, before anything is lost."""

from __future__ import annotations


import pytest
import torch

from dopd import pipeline
from dopd.models import Pair, check_vocab, tiny_qwen3
from dopd.rollout import sample
from dopd.tasks.arith import ArithTask
from dopd.tokenizer import char_tokenizer
from dopd.view import PrivilegedView
from tests.conftest import FAST, compose_cfg, free_port
from tests.test_configs import _train_py

TOK = char_tokenizer()


@pytest.mark.parametrize("group", ["task", "model", "rollout", "trainer", "logger"])
def test_unknown_group_option_lists_the_valid_ones(group):
    res = _train_py(f"{group}=nonexistent")
    assert res.returncode != 0 and f"Could not find '{group}/nonexistent'" in res.stderr
    assert "Available options" in res.stderr


def test_empty_dataset(tmp_path, tracking_uri):
    with pytest.raises(ValueError, match="data.n_train=0 must be > 0"):  # checked before any model loads
        pipeline.run(compose_cfg([*FAST, "data.n_train=0", f"logger.tracking_uri={tracking_uri}"], tmp_path))


def test_vocabulary_mismatch_is_named():
    """Padded extra rows are fine (tests/test_real_models.py); a model missing rows of the tokenizer is not."""
    s, t = tiny_qwen3(len(TOK) + 5, hidden_size=16, num_hidden_layers=1), tiny_qwen3(len(TOK) - 5, hidden_size=16, num_hidden_layers=1)
    with pytest.raises(ValueError, match="vocabularies differ.*'pair-x'|'pair-x'.*vocabularies differ"):
        check_vocab(s, t, TOK, "pair-x")


def test_bad_rollout_settings():
    model, view, exs = tiny_qwen3(len(TOK), hidden_size=16, num_hidden_layers=1), PrivilegedView(TOK), ArithTask().examples("test", 2, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        sample(model, view, exs, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k=1000 exceeds the vocabulary"):
        sample(model, view, exs, top_k=1000)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(model, view, exs, temperature=0.0)


def test_bad_templates_are_named():
    with pytest.raises(ValueError, match="must contain {hint}"):
        PrivilegedView(TOK, privileged="Q:{question}\n")
    with pytest.raises(ValueError, match="hint_form"):
        ArithTask(hint_form="oracle")


def test_unknown_hint_form_override(tmp_path):
    with pytest.raises(Exception, match="hint_form"):
        pipeline.build_task(compose_cfg(["task.hint_form=oracle"], tmp_path).task)


def test_bad_router_values(tmp_path):
    for override, field in (("router.gap.trim_top=1.2", "trim_top"), ("router.rules.all.scope=dense", "scope"),
                            ("router.rules.all.divergence=tv", "divergence"), ("router.prune.fraction=-0.1", "fraction")):
        with pytest.raises(ValueError, match=field):
            pipeline.build_router(compose_cfg([override], tmp_path).router)



def test_unreachable_tracking_server_fails_before_loading_models(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_pair", lambda *a, **k: pytest.fail("models loaded before the server check"))
    cfg = compose_cfg([*FAST, f"logger.tracking_uri=http://127.0.0.1:{free_port()}"], tmp_path)
    with pytest.raises(ConnectionError, match="unreachable"):
        pipeline.run(cfg)


def test_unwritable_tracking_folder(tmp_path):
    cfg = compose_cfg([*FAST, "logger.tracking_uri=sqlite:////proc/dopd/mlflow.db"], tmp_path)
    with pytest.raises(PermissionError, match="writable location"):
        pipeline.run(cfg)


def test_nonfinite_losses_are_skipped_counted_and_abort_after_the_limit(tmp_path, tracking_uri, monkeypatch):
    real = pipeline.load_pair

    def nan_teacher(*a, **k):
        pair = real(*a, **k)
        with torch.no_grad():
            for p in pair.teacher.parameters():
                p.fill_(float("nan"))
        return Pair(pair.student, pair.teacher, pair.tokenizer, pair.name)

    monkeypatch.setattr(pipeline, "load_pair", nan_teacher)
    cfg = compose_cfg([*FAST, "trainer.max_steps=5", "optim.max_nonfinite_steps=2", "eval.routing_samples=0",
                       f"logger.tracking_uri={tracking_uri}"], tmp_path)
    with pytest.raises(FloatingPointError, match="NaN/inf on 3 steps"):
        pipeline.run(cfg)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    assert r.info.status == "FAILED" and "FloatingPointError" in r.data.tags["error"]
    assert [m.value for m in client.get_metric_history(r.info.run_id, "train/nonfinite_steps")] == [1.0, 2.0]
