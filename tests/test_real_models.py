"""The real-model path without the hub: every conf/model/qwen3_*.yaml, pointed at tiny random Qwen3 checkpoints
saved to disk with a Qwen3-style chat tokenizer, loads in bf16, formats chat contexts and trains a step.

Also the vocabulary guard: output layers padded past the tokenizer are accepted and change nothing on the real
vocabulary (and padded ids are never sampled); a tokenizer larger than a model, or a different tokenizer, is not.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything reads it; the fixture below also patches the live constant

from pathlib import Path

import huggingface_hub.constants
import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dopd.models import check_vocab, load_pair, tiny_qwen3
from dopd.pipeline import build_router, build_task, build_view, run
from dopd.routing import routed_loss
from dopd.rollout import sample
from dopd.tokenizer import DEFAULT_ALPHABET
from tests.conftest import FAST, compose_cfg, one_distillation_step
from tests.test_configs import options

QWEN3 = [o for o in options("model") if o.startswith("qwen3_") and not o.startswith("qwen3_vl")]  # VL: test_vision.py
SPECIALS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template, reduced to what the harness uses: user turns, the generation prompt, and the empty think
# block that `enable_thinking=False` inserts (the non-thinking mode the paper's models run in).
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def qwen3_style_tokenizer(alphabet: str = DEFAULT_ALPHABET + "\\{}'\"^$%&@") -> PreTrainedTokenizerFast:
    """Characters as tokens plus Qwen3's chat specials: <|im_end|> ends a turn (EOS), <|endoftext|> pads."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *dict.fromkeys(alphabet)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines are tokens too
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


TOK = qwen3_style_tokenizer()


def _save(folder: Path, tok, *, seed: int, hidden: int, layers: int, extra_rows: int = 0, tie: bool = True) -> str:
    model = tiny_qwen3(len(tok) + extra_rows, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                       num_key_value_heads=1, seed=seed, tie_word_embeddings=tie)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A teacher (untied head, like Qwen3-8B) and a smaller student (tied, like Qwen3-0.6B/1.7B), both padded past
    the tokenizer by different amounts, as the real checkpoints are."""
    root = tmp_path_factory.mktemp("qwen3")
    return {"teacher": _save(root / "teacher", TOK, seed=1, hidden=48, layers=2, extra_rows=12, tie=False),
            "student": _save(root / "student", TOK, seed=0, hidden=32, layers=1, extra_rows=5)}


def _overrides(name: str, ckpt: dict[str, str]) -> list[str]:
    return [f"model={name}", f"model.teacher.path={ckpt['teacher']}", f"model.student.path={ckpt['student']}"]


@pytest.mark.parametrize("name", QWEN3)
def test_qwen3_config_loads_bf16_chat_pair_and_takes_a_step(name, checkpoints, tmp_path):
    cfg = compose_cfg([*_overrides(name, checkpoints), "router=dopd", "task=jsonl"], tmp_path)
    assert cfg.model.chat and cfg.model.chat_kwargs.enable_thinking is False
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True))
    assert pair.tokenizer.eos_token == "<|im_end|>" and len(pair.tokenizer) == len(TOK)
    for model in (pair.student, pair.teacher):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    view = build_view(cfg, pair.tokenizer)
    task = build_task(cfg.task)
    (ex,) = task.examples("train", 1, 0)
    plain, priv = view.text(ex, privileged=False), view.text(ex, privileged=True)
    for text in (plain, priv):
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert ex.question in text
    assert ex.hint in priv and ex.hint not in plain
    ctx = view.contexts([ex], privileged=True)
    assert pair.tokenizer.unk_token_id not in ctx.input_ids.tolist()[0][:20]  # the chat specials are real tokens

    # One DOPD update by hand: rollout, the four aligned passes, the routed loss, a gradient on the student only.
    from dopd.module import DistillModule

    module = DistillModule(pair.student, pair.teacher, view, build_router(cfg.router), task, rollout=cfg.rollout,
                           optim=cfg.optim, eval=cfg.eval)
    module.rollout_cfg.update(n=2, max_new_tokens=6)
    roll, targets, _ = one_distillation_step(module, task.examples("train", 2, 0))
    assert int(roll.tokens.max()) < len(TOK)
    assert set(targets) == {"teacher_priv", "student_priv"}
    assert targets["teacher_priv"].shape[-1] == len(TOK)


@pytest.mark.slow
def test_train_py_runs_a_qwen3_config_end_to_end(checkpoints, tmp_path, tracking_uri):
    """train.py's path (Lightning, MLflow, evaluation) with a real-model config, the JSONL task and DOPD."""
    fast = [o for o in FAST if not o.startswith("model=")]
    cfg = compose_cfg([*fast, *_overrides("qwen3_8b_1.7b", checkpoints), "router=dopd", "task=jsonl",
                       "trainer.max_steps=1", "data.n_eval=2", "eval.routing_samples=0",
                       f"logger.tracking_uri={tracking_uri}"], tmp_path)
    acc = run(cfg)
    assert 0.0 <= acc <= 1.0
    client = mlflow.MlflowClient(tracking_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["pair"] == "qwen3-8b-1.7b"
    assert "train/loss" in r.data.metrics and "eval/acc/test" in r.data.metrics


# -- the vocabulary guard ----------------------------------------------------------------------------------------
def _padded_copy(model, extra: int, bias: float = 0.0):
    """The same model with `extra` output rows appended; `bias` on those rows makes them win every argmax."""
    v, h = model.lm_head.weight.shape
    padded = tiny_qwen3(v + extra, hidden_size=h, num_hidden_layers=model.config.num_hidden_layers,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    state = {k: val for k, val in model.state_dict().items() if not k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    padded.load_state_dict(state, strict=False)
    with torch.no_grad():
        padded.model.embed_tokens.weight[:v] = model.model.embed_tokens.weight
        padded.lm_head.weight[:v] = model.lm_head.weight
        if bias:
            head = torch.nn.Linear(h, v + extra, bias=True)
            head.weight.copy_(padded.lm_head.weight)
            head.bias.zero_()
            head.bias[v:] = bias
            padded.lm_head = head
    return padded.eval()


def test_padded_rows_are_accepted_and_change_nothing_on_the_real_vocabulary(tmp_path):
    from dopd.view import PrivilegedView, response_logits

    spec = dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    student = tiny_qwen3(len(TOK), hidden_size=32, num_hidden_layers=1, seed=0, **spec).eval()
    teacher = tiny_qwen3(len(TOK), hidden_size=48, num_hidden_layers=2, seed=1, **spec).eval()
    # Qwen3-style: rows padded past the tokenizer, by different amounts, and with junk that would dominate.
    student_p, teacher_p = _padded_copy(student, 9, bias=50.0), _padded_copy(teacher, 4, bias=-50.0)
    assert check_vocab(student_p, teacher_p, TOK, "padded") == len(TOK)

    view = PrivilegedView(TOK, chat=True, chat_kwargs={"enable_thinking": False})
    router = build_router(compose_cfg(["router=dopd"], tmp_path).router)
    exs = build_task(compose_cfg(["task=jsonl"], tmp_path).task).examples("train", 3, 0)
    roll = sample(student, view, exs, n=2, max_new_tokens=8)
    losses = []
    for s, t in ((student, teacher), (student_p, teacher_p)):
        logits = {"teacher_priv": response_logits(t, view.contexts(roll.examples, True), roll.tokens, roll.mask),
                  "student_priv": response_logits(s, view.contexts(roll.examples, True), roll.tokens, roll.mask)}
        s_logits = response_logits(s, view.contexts(roll.examples, False), roll.tokens, roll.mask)
        assert s_logits.shape[-1] == len(TOK)
        losses.append((s_logits, routed_loss(router, s_logits, roll.tokens, roll.mask, **logits)))
    (ref_logits, ref), (pad_logits, pad) = losses
    torch.testing.assert_close(pad_logits, ref_logits)
    torch.testing.assert_close(pad.loss, ref.loss)
    assert torch.equal(pad.regime, ref.regime)

    # Sampling never emits a padded id, even when those rows carry all the probability mass...
    for do_sample in (True, False):
        roll_p = sample(student_p, view, exs, n=2, max_new_tokens=8, do_sample=do_sample)
        assert int(roll_p.tokens.max()) < len(TOK)
    # ...which they do: with the guard off (vocab_size = all rows) every sampled token is a padded one.
    unguarded = PrivilegedView(TOK, chat=True, chat_kwargs={"enable_thinking": False}, vocab_size=len(TOK) + 9)
    assert (sample(student_p, unguarded, exs, max_new_tokens=3).tokens >= len(TOK)).all()


def test_tokenizer_larger_than_a_model_is_rejected():
    ok = tiny_qwen3(len(TOK), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    short = tiny_qwen3(len(TOK) - 3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=rf"tokenizer has {len(TOK)} tokens but the teacher only {len(TOK) - 3}"):
        check_vocab(ok, short, TOK, "pair-x")
    with pytest.raises(ValueError, match="the student only .* and the teacher only"):
        check_vocab(short, short, TOK, "pair-x")


def test_a_pair_with_different_tokenizers_is_rejected_naming_both(tmp_path, monkeypatch):
    other = qwen3_style_tokenizer(DEFAULT_ALPHABET[::-1] + "\\{}'\"^$%&@")  # same size, other ids
    assert len(other) == len(TOK)
    teacher = _save(tmp_path / "teacher", other, seed=1, hidden=16, layers=1)
    student = _save(tmp_path / "student", TOK, seed=0, hidden=16, layers=1)
    cfg = compose_cfg(_overrides("qwen3_8b_1.7b", {"teacher": teacher, "student": student}), tmp_path)
    import dopd.models

    monkeypatch.setattr(dopd.models, "load_model", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(ValueError, match="different tokenizers") as err:
        load_pair(OmegaConf.to_container(cfg.model, resolve=True))
    assert f"model.teacher ({teacher}" in str(err.value) and f"model.tokenizer ({student}" in str(err.value)


def test_student_gradient_checkpointing_changes_no_gradient(tmp_path):
    """model.student.gradient_checkpointing (on in the GPU configs) recomputes activations; the gradient is the same.

    Through the module's own passes: without checkpointing the trained pass shares each prompt's context across
    its rollouts; with it (no KV cache to hand on) it runs one context per row. Both give the same gradient."""
    from dopd.module import forward_passes, shared_context_group
    from dopd.view import PrivilegedView

    grads = []
    for on in (False, True):
        cfg = compose_cfg(["model=tiny_random", "router=vanilla",
                           f"+model.student.gradient_checkpointing={str(on).lower()}"], tmp_path)
        pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True))
        student = pair.student.train()
        assert student.is_gradient_checkpointing == on and not pair.teacher.is_gradient_checkpointing
        view = PrivilegedView(pair.tokenizer)
        exs = build_task(compose_cfg(["task=arith"], tmp_path).task).examples("test", 3, 0)
        torch.manual_seed(0)
        roll = sample(student, view, exs, n=2, max_new_tokens=8)
        assert shared_context_group(student, roll) == (1 if on else 2)
        logits, _ = forward_passes(student, pair.teacher, view, build_router(cfg.router), roll)
        logits[roll.mask].logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _pair_cfg(student: str, teacher: str, tokenizer: str | None = None) -> dict:
    return {"name": "x", "tokenizer": tokenizer or student, "student": {"source": "pretrained", "path": student},
            "teacher": {"source": "pretrained", "path": teacher}}


@pytest.mark.parametrize("missing", ["./nope/student", "/nope/student", "~/nope/student", "tests/nope"])
def test_a_missing_model_folder_is_named_not_taken_for_a_hub_id(checkpoints, missing):
    with pytest.raises(FileNotFoundError) as err:
        load_pair(_pair_cfg(missing, checkpoints["teacher"], tokenizer=checkpoints["student"]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.student.path={missing}: no such folder"), msg
    assert "Repo id" not in msg


def test_a_truncated_safetensors_names_the_role_and_the_file_before_loading(checkpoints, tmp_path, monkeypatch):
    import shutil

    import dopd.models

    broken = tmp_path / "teacher"
    shutil.copytree(checkpoints["teacher"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(dopd.models, "load_model", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(ValueError) as err:
        load_pair(_pair_cfg(checkpoints["student"], str(broken)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.teacher.path={broken}: {broken / 'model.safetensors'} is "
                                              "truncated"), msg
    assert "download or copy the teacher again" in msg


def test_an_error_inside_from_pretrained_names_the_role_and_path(checkpoints, monkeypatch):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    def damaged(*a, **k):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", damaged)
    with pytest.raises(RuntimeError) as err:
        load_pair(_pair_cfg(checkpoints["student"], checkpoints["teacher"]))
    msg = str(err.value)
    assert msg.startswith(f"model.student.path={checkpoints['student']}: loading the student from") and \
        "incomplete metadata" in msg and "\n" not in msg


def test_a_model_folder_without_tokenizer_files_is_named(checkpoints, tmp_path):
    bare = tmp_path / "bare"
    tiny_qwen3(len(TOK), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
               ).save_pretrained(bare)
    with pytest.raises(FileNotFoundError) as err:  # model.tokenizer is the student's folder, as in the qwen3 configs
        load_pair(_pair_cfg(str(bare), checkpoints["teacher"]))
    msg = str(err.value)
    assert msg.startswith(f"model.tokenizer={bare}: the folder has no tokenizer files (none of tokenizer.json"), msg
    assert "different tokenizers" not in msg
    # a teacher folder without a tokenizer is fine: it uses model.tokenizer (was: "different tokenizers (1 tokens)")
    pair = load_pair(_pair_cfg(checkpoints["student"], str(bare)))
    assert len(pair.tokenizer) == len(TOK)
