"""Is a distillation run's early accuracy drop the objective's doing, or the optimizer's and the batch's?

    python scripts/batch_noise.py --target gold optim.lr=1e-3 trainer.max_steps=100    # SFT on reference solutions
    python scripts/batch_noise.py --target teacher optim.lr=1e-3                       # the router's loss, gold prefixes
    python scripts/batch_noise.py --target onpolicy optim.lr=1e-3                      # what train.py does
    python scripts/batch_noise.py --target gold data.batch_size=64 rollout.n=1         # same rows, 64 distinct prompts

It trains the configured student (any Hydra override of train.py; `experiment=table1` by default) for
`trainer.max_steps` steps with exactly the distillation run's optimizer (`optim`: AdamW, warmup, schedule, clipping
at `trainer.gradient_clip_val`) and batch shape (`data.batch_size` prompts x `rollout.n` rows each), on one of
three kinds of data:

- `gold`: cross-entropy on the task's reference solutions (plain SFT), each prompt's solution repeated
  `rollout.n` times as its rollouts would be;
- `teacher`: the router's own loss against the frozen teacher, on the reference solutions instead of samples;
- `onpolicy`: the router's loss on the student's own samples (a distillation run without Lightning).

Greedy accuracy without p on train.py's held-out splits (`data.n_eval` questions each, never trained on) is printed
every `--every` steps, per split and domain, with the splits' average (the tables' Avg). If `gold` drops as far
as `onpolicy`, the drop comes from the step size and the batch, not from distillation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dopd.optim import build_optimizer  # noqa: E402
from dopd.pipeline import compose_config  # noqa: E402

TARGETS = ("gold", "teacher", "onpolicy")


def compose(overrides: list[str]):
    return compose_config(["experiment=table1", *overrides])


def gold_batch(view, examples, n):
    """Contexts and reference-solution ids laid out as `rollout.sample` lays out n rollouts per prompt."""
    rows = [ex for ex in examples for _ in range(n)]
    ids, mask = view.response_ids([ex.solution for ex in rows])
    return view.contexts(rows, privileged=False), ids, mask.bool()


def step_loss(target, student, teacher, view, router, examples, cfg):
    from dopd.rollout import sample
    from dopd.routing import routed_loss
    from dopd.view import response_logits

    n = int(cfg.rollout.n)
    if target == "onpolicy":
        r = cfg.rollout
        roll = sample(student, view, examples, n=n, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                      top_p=r.top_p, top_k=r.top_k)
        ctx, tokens, mask = roll.context, roll.tokens, roll.mask
    else:
        ctx, tokens, mask = gold_batch(view, examples, n)
    logits = response_logits(student, ctx, tokens, mask)
    if target == "gold":  # Eq. 11's normalisation: each sequence's token mean, then the mean over sequences
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)
        return ((ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    with torch.no_grad():
        teacher_logits = response_logits(teacher, ctx, tokens, mask)
    return routed_loss(router, logits, tokens, mask, teacher=teacher_logits).loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    ap.add_argument("--target", choices=TARGETS, default="gold", help="what the student is trained on (default gold)")
    ap.add_argument("--every", type=int, default=25, help="steps between evaluations (default 25)")
    ap.add_argument("--json", help="write the accuracy curve here")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dopd.data import PromptDataModule
    from dopd.evaluation import accuracy_table
    from dopd.models import load_pair
    from dopd.pipeline import build_router, build_task, build_view

    cfg = compose(args.overrides)
    router = build_router(cfg.router)
    if args.target != "gold" and set(router.passes) != {"teacher"}:
        raise SystemExit(f"--target {args.target} needs a router whose only target is the teacher without p "
                         f"(router=vanilla, opd_sampled, ...); {router.name!r} reads {sorted(router.passes)}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    task = build_task(cfg.task)
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True), root=ROOT)
    view, student = build_view(cfg, pair.tokenizer), pair.student
    data = PromptDataModule(task, n_train=cfg.data.n_train, n_eval=cfg.data.n_eval, data_seed=cfg.data.seed)
    data.setup()  # train.py's own split: evaluation questions never trained on
    train, evals = data.train_examples, data.eval_examples
    steps, o = int(cfg.trainer.max_steps), OmegaConf.to_container(cfg.optim, resolve=True)
    opt, sched = build_optimizer(student.parameters(), o, steps)
    clip, rng = cfg.trainer.get("gradient_clip_val"), random.Random(cfg.seed)
    print(f"{args.target}: {steps} steps of {cfg.data.batch_size} prompts x {cfg.rollout.n} rows, lr {o['lr']}, "
          f"router {router.name}; greedy accuracy on {cfg.data.n_eval} questions per held-out split")

    curve = []

    def evaluate(step):
        acc = accuracy_table(student, view, task, evals, prefix="acc", max_new_tokens=cfg.rollout.max_new_tokens,
                             batch_size=cfg.eval.batch_size)
        curve.append({"step": step, **{k: round(v, 4) for k, v in acc.items()}})
        print(f"step {step:4d}  " + "  ".join(f"{k[4:]} {100 * v:5.1f}" for k, v in acc.items()), flush=True)

    student.train()  # loaded in eval mode; sampling and evaluation restore whatever mode they find
    evaluate(0)
    for step in range(1, steps + 1):
        loss = step_loss(args.target, student, pair.teacher, view, router, rng.sample(train, cfg.data.batch_size), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
        opt.step()
        sched.step()
        if step % args.every == 0 or step == steps:
            evaluate(step)
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "overrides": args.overrides, "curve": curve},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
