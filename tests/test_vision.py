"""The vision-language path: Qwen3-VL pairs from a config, the image in x only, and every router on one VLM step.

No downloads: the tiny pairs are Qwen3VLForConditionalGeneration built from a transformers config, and the
processor is dopd.vision.ImageTextProcessor (Qwen3VLProcessor's contract for one image per prompt).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from dopd.models import load_pair
from dopd.module import DistillModule
from dopd.pipeline import build_router, build_task, build_view, run
from dopd.rollout import sample
from dopd.tasks.base import Example
from dopd.view import PrivilegedView, response_logits
from dopd.vision import IMAGE_PAD, ImageTextProcessor, tiny_qwen3_vl, vision_token_ids
from tests.conftest import FAST, compose_cfg, one_distillation_step
from tests.test_configs import options

VISION = ["model=tiny_random_vl", "task=scenes"]
PLAIN, PRIV = "{image}Q:{question}\n", "{image}H:{hint}\nQ:{question}\n"


def _image(colour: str, size: int = 96) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).rectangle([10, 10, 40, 40], fill=colour)
    return im


def _examples() -> list[Example]:
    return [Example("what colour?", "box [10,10,40,40]", "red", "red\n#red", image=_image("red")),
            Example("and what colour is this one?", "a longer hint [1,2,3,4]", "blue", "blue\n#blue",
                    image=_image("blue", 64))]


@pytest.fixture(scope="module")
def pair():
    return load_pair(OmegaConf.to_container(compose_cfg(VISION).model, resolve=True))


def test_processor_expands_one_token_per_merged_patch():
    proc = ImageTextProcessor()
    enc = proc(text=[f"<|vision_start|>{IMAGE_PAD}<|vision_end|>Q:a\n"] * 2, images=[_image("red"), _image("red", 64)])
    grid = enc["image_grid_thw"]
    per_row = (enc["input_ids"] == proc.image_token_id).sum(-1)
    assert per_row.tolist() == (grid.prod(-1) // 4).tolist() == [9, 4]  # 96 px: 6x6 patches of 16 -> 3x3 merged
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == proc.image_token_id)
    assert enc["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    with pytest.raises(ValueError, match="exactly once"):
        proc(text=["Q:no image\n"], images=[_image("red")])
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        proc(text=["a", "b"], images=[_image("red")])


def test_view_needs_image_slot_and_images(pair):
    with pytest.raises(ValueError, match="needs {image}"):
        PrivilegedView(pair.tokenizer, plain="Q:{question}\n", privileged=PRIV, processor=pair.processor)
    with pytest.raises(ValueError, match="needs a vision-language model"):
        PrivilegedView(pair.tokenizer, plain=PLAIN, privileged=PRIV)
    view = PrivilegedView(pair.tokenizer, plain=PLAIN, privileged=PRIV, processor=pair.processor)
    with pytest.raises(ValueError, match="no image"):
        view.contexts([Example("q", "h", "a", "s")], privileged=False)


def test_response_logprobs_do_not_depend_on_prompt_length_or_padding(pair):
    """The alignment guarantee for VLMs: a row's response logits are the same alone and left-padded in a batch
    beside a longer prompt (M-RoPE positions come from the attention mask)."""
    view = PrivilegedView(pair.tokenizer, plain=PLAIN, privileged=PRIV, processor=pair.processor)
    exs = _examples()
    response = torch.tensor([[pair.tokenizer.convert_tokens_to_ids(c) for c in "red\n#"]] * 2)
    mask = torch.ones_like(response, dtype=torch.bool)
    for model in (pair.student, pair.teacher):
        for privileged in (False, True):
            both = response_logits(model, view.contexts(exs, privileged), response, mask)
            for i in range(2):
                alone = response_logits(model, view.contexts(exs[i : i + 1], privileged), response[i : i + 1],
                                        mask[i : i + 1])
                torch.testing.assert_close(alone[0], both[i], atol=1e-5, rtol=1e-5)
    # ... and the image matters: a different image changes the response logits.
    other = [Example(exs[0].question, exs[0].hint, "x", "x", image=_image("green"))]
    a = response_logits(pair.teacher, view.contexts(exs[:1], False), response[:1], mask[:1])
    b = response_logits(pair.teacher, view.contexts(other, False), response[:1], mask[:1])
    assert (a - b).abs().max() > 1e-4


def test_rollouts_never_contain_image_tokens():
    proc = ImageTextProcessor()
    model = tiny_qwen3_vl(proc.tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vision_depth=1, vision_hidden_size=16)
    banned = vision_token_ids(proc.tokenizer)
    with torch.no_grad():  # make the vision tokens by far the likeliest outputs
        model.lm_head.weight[banned] += 50 * model.lm_head.weight.abs().max()
    view = PrivilegedView(proc.tokenizer, plain=PLAIN, privileged=PRIV, processor=proc)
    roll = sample(model, view, _examples(), n=3, max_new_tokens=6)
    assert not torch.isin(roll.tokens, torch.tensor(banned)).any()


@pytest.mark.parametrize("router", options("router"))
def test_every_router_takes_a_vlm_step(router, pair, tmp_path):
    """One training step of each router on the scenes testbed: rollouts from (image, question), the privileged
    passes with p, a finite loss, gradients in the student only."""
    cfg = compose_cfg([*VISION, f"router={router}"], tmp_path)
    task = build_task(cfg.task)
    view = build_view(cfg, pair.tokenizer, pair.processor)
    module = DistillModule(pair.student, pair.teacher, view, build_router(cfg.router), task,
                           rollout={"n": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0},
                           optim=dict(cfg.optim), eval=dict(cfg.eval))
    one_distillation_step(module, task.examples("train", 2, 0))


def test_vlm_run_end_to_end(tmp_path, tracking_uri):
    """train.py's path on the vision pair: trains, evaluates per domain, logs to MLflow, exports the student with
    its processor (so a later stage can load it)."""
    cfg = compose_cfg([*FAST, *VISION, "router=dopd", f"logger.tracking_uri={tracking_uri}", "export_student=true"],
                      tmp_path)
    acc = run(cfg)
    assert 0.0 <= acc <= 1.0
    client = mlflow.MlflowClient(tracking_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["pair"] == "tiny-random-vl"
    assert "eval/acc/test" in r.data.metrics and "train/regime/HT/frac" in r.data.metrics
    exported = tmp_path / "run" / "student"
    reloaded = load_pair({"name": "x", "modality": "vision", "processor": str(exported),
                          "student": {"source": "pretrained", "path": str(exported)},
                          "teacher": {"source": "pretrained", "path": str(exported)}})
    assert type(reloaded.student).__name__ == "Qwen3VLForConditionalGeneration"
    assert isinstance(reloaded.processor, ImageTextProcessor)


def test_qwen3_vl_config_loads_tiny_checkpoints_in_bf16(tmp_path):
    """conf/model/qwen3_vl_8b_2b.yaml, its paths pointed at tiny random Qwen3-VL checkpoints of the same class,
    loads both in bf16 with the student's processor, formats chat contexts with the image, and trains a step."""
    from tests.test_real_models import CHAT_TEMPLATE

    for role, (hidden, layers, depth) in {"teacher": (64, 2, 2), "student": (32, 1, 1)}.items():
        proc = ImageTextProcessor()
        proc.tokenizer.chat_template = CHAT_TEMPLATE
        model = tiny_qwen3_vl(proc.tokenizer, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=1, vision_depth=depth, vision_hidden_size=16, seed=len(role))
        model.save_pretrained(tmp_path / role)
        proc.save_pretrained(tmp_path / role)
    cfg = compose_cfg(["model=qwen3_vl_8b_2b", "task=scenes", f"model.teacher.path={tmp_path / 'teacher'}",
                       f"model.student.path={tmp_path / 'student'}"], tmp_path)
    assert cfg.model.student.dtype == cfg.model.teacher.dtype == "bfloat16" and cfg.model.chat
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True))
    assert {p.dtype for p in pair.student.parameters()} == {torch.bfloat16}
    view = build_view(cfg, pair.tokenizer, pair.processor)
    text = view.text(_examples()[0], privileged=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>H:")
    module = DistillModule(pair.student, pair.teacher, view, build_router(cfg.router), build_task(cfg.task),
                           rollout={"n": 1, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0},
                           optim=dict(cfg.optim), eval=dict(cfg.eval))
    one_distillation_step(module, _examples())
