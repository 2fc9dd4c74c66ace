"""scripts/bench.py on a tiny workload: every figure is produced, finite and positive (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import dopd
from dopd.routing import RouterSpec, Rule, dopd_spec


def _load_bench():
    spec = importlib.util.spec_from_file_location("dopd_bench", dopd.PROJECT_ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)
    return module


def _routers(entries):
    """The bench's router labels built directly (the config path is covered by tests/test_configs.py)."""
    specs = {"vanilla": RouterSpec("vanilla", {"all": Rule("teacher", "rkl", "topk")}), "dopd": dopd_spec()}
    return {label: specs[label] for label, _ in entries}


def test_bench_tiny_run_produces_all_figures(tmp_path):
    bench = _load_bench()
    trl_available = importlib.util.find_spec("trl") is not None
    argv = ["--tiny", "--silent", "--threads", "1"] + ([] if trl_available else ["--no-trl"])
    result = bench.run(bench.parse_args(argv), router_loader=_routers, loss_runner=bench.loss_worker)
    path = tmp_path / "bench.json"
    bench.write_json(result, path)
    data = json.loads(path.read_text())

    def positive(value):
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    headline = ["dopd_over_vanilla", "chunked_over_naive_peak_mem", "chunked_over_naive_time",
                "train_flops_over_matmul_peak", "step_rollout_speedup"] + (["ours_over_trl_gkd"] if trl_available else [])
    for key in headline:
        assert positive(data[key]), (key, data[key])
    assert set(bench.TARGETS) <= set(data["targets"]) and "ours_over_trl_gkd" in data
    sr = data["step_rollouts"]  # the step's rows in one call against one call per micro-batch
    assert sr["step"]["calls"] == 1 and sr["per_micro_batch"]["calls"] == sr["micro_batches"] == 2

    pair = data["pairs"]["tiny"]
    assert pair["student_params"] > 0 and pair["teacher_params"] > 0
    for name in ("vanilla", "dopd"):
        r = pair["routers"][name]
        for key in ("step_ms", "step_ms_wall", "gen_tok_s", "trained_tok_s", "peak_mib", "student_train_gflop_s"):
            assert positive(r[key]), (name, key, r[key])
        assert set(r["breakdown_ms"]) == set(bench.SECTIONS)
        assert all(math.isfinite(v) and v >= 0 for v in r["breakdown_ms"].values())
    assert pair["routers"]["dopd"]["breakdown_ms_wall"]["priv_student_fwd"] > 0  # DOPD runs the privileged student
    assert positive(pair["lightning"]["vanilla"]["step_ms_cpu"])
    if trl_available:
        assert positive(pair["trl_gkd"]["step_ms_wall"]) and positive(pair["trl_gkd"]["trained_tokens"])
    assert data["loss"]["equal_results"] is True
    assert positive(data["matmul"]["gflop_s_wall"])
    for ablation in pair["ablations"].values():
        assert positive(ablation["before_ms"]) and positive(ablation["after_ms"])


def test_id_view_drives_the_real_rollout():
    """The larger pairs' token-id view must satisfy what rollout.sample reads off a view (it once lacked vocab_size)."""
    from dopd.models import tiny_qwen3
    from dopd.rollout import sample
    from dopd.tasks.base import Example

    bench = _load_bench()
    view = bench.IdView(64)
    model = tiny_qwen3(64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    roll = sample(model, view, [Example(question="5 6 7", hint="8 9", answer="-", solution="")], n=2, max_new_tokens=4)
    assert roll.tokens.shape[0] == 2 and int(roll.tokens.max()) < 64


def test_flops_probe_measures_the_students_forward_backward():
    """--quick reads the FLOP-ratio target off the 30M student alone; here on a small id pair."""
    bench = _load_bench()
    spec = bench.PairSpec("probe", bench._arch(32, 1, 2, 1), bench._arch(32, 1, 2, 1), vocab=256, prompts=2, n=2,
                          max_new_tokens=4, context=(4, 6))
    probe = bench.bench_train_flops(spec, "cpu", None, reps=1)
    assert probe["rows"] == 4 and probe["seq_len"] == 5 + 4
    assert math.isclose(probe["gflop"] * 1e9, 3 * (2 * 4 * 9 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 128 * 3)
                                                   + 4 * 2 * 16 * 9 * 9 * 4 + 2 * 256 * 32 * 4 * 5), rel_tol=1e-9)
    assert probe["best_s"] > 0 and math.isfinite(probe["gflop_s"]) and probe["gflop_s"] > 0


def test_train_flops_counts_a_shared_context_once():
    """With rollouts sharing their prompt's context pass, the context's linear and attention FLOPs count once per
    prompt and the responses attend to context + response; with no context both counts agree."""
    from dopd.models import tiny_qwen3

    bench = _load_bench()
    model = tiny_qwen3(256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    lin, attn, head = 32 * 32 * 2 + 32 * 16 * 2 + 32 * 128 * 3, 4 * 1 * 2 * 16, 2 * 256 * 32
    rows, context, response = 8, 6, 5
    shared = bench.train_flops(model, rows, context, response, group=4)
    expected = 3 * (2 * lin * (2 * context + rows * response)
                    + attn * (2 * context * context + rows * response * (context + response)) + head * rows * 6)
    assert math.isclose(shared, expected, rel_tol=1e-12)
    assert shared < bench.train_flops(model, rows, context, response)
    assert math.isclose(bench.train_flops(model, rows, 0, response, group=4), bench.train_flops(model, rows, 0, response))
