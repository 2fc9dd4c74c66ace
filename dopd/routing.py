"""The routing engine: per-token supervision chosen by the privilege advantage gap. The DOPD rule lives here.

Every router (vanilla OPD, privileged variants, DOPD, its ablations, baselines) is a `RouterSpec`: which
context the trained student sees, how the gap thresholds are computed, and one `Rule` per regime (or one rule
for all tokens). One function, `routed_loss`, executes any spec. Pure tensors, no Lightning.

DOPD (paper sections 2.2, 2.6-2.8), per response token n sampled by the student from x alone:

    q_S = Pi_S(y_n | x, p, y<n)   (privileged student, same weights, no grad)
    q_T = Pi_T(y_n | x, p, y<n)   (privileged teacher, frozen)
    A   = |log q_T - log q_S|                                            (Eq. 1)
    LH: A <  A_bar and q_S + q_T >= qS_bar + qT_bar   -> 0.6 * top-K reverse KL to the privileged teacher
    LL: A <  A_bar and q_S + q_T <  qS_bar + qT_bar   -> 0.3 * top-K reverse KL to sg[privileged student]
    HT: A >= A_bar and q_T >= q_S                     -> 1.0 * full-vocabulary JS to the privileged teacher
    HS: A >= A_bar and q_T <  q_S                     -> 0.6 * top-K reverse KL to sg[privileged student]

with the bars the trimmed batch means of A, q_S and q_T (drop the top 5% of each, average the rest), and the
loss the mean over sequences of each sequence's mean token loss (Eq. 11). Gradients reach only the
unprivileged student's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from dopd.divergences import DIVERGENCES, SCOPES, divergence

REGIMES = ("LH", "LL", "HT", "HS")
# How tokens are split into groups, each with its own rule(s); the grouping is named by the rule keys.
GROUPINGS = {
    "all": ("all",),  # one rule for every token (vanilla OPD and the privileged variants)
    "gap": REGIMES,  # DOPD's four regimes from the privilege advantage gap
    "entropy": ("low_entropy", "high_entropy"),  # EOPD-style: the teacher's entropy at the token
    "tip": ("selected", "rest"),  # TIP-style: student uncertainty or teacher-student disagreement
}
TARGETS = ("teacher", "teacher_priv", "student_priv")
PRUNE_BY = ("random", "low_gap", "high_gap")
SELECTION_SCOPES = ("step", "micro_batch")


@dataclass(frozen=True)
class Rule:
    """How one group of tokens is supervised."""

    target: str = "teacher_priv"  # teacher (sees x) | teacher_priv (sees x, p) | student_priv (sg, sees x, p)
    divergence: str = "rkl"  # fkl | rkl | js
    scope: str = "topk"  # sampled | topk | full
    weight: float = 1.0
    beta: float = 0.5  # JS mixture weight (TRL convention); ignored by fkl/rkl
    top_k: int = 128
    support: str = "student"  # whose top-K: student | target
    tail: bool = False  # top-K with a tail bucket instead of renormalisation

    def __post_init__(self):
        for name, value, valid in (("target", self.target, TARGETS), ("divergence", self.divergence, DIVERGENCES),
                                   ("scope", self.scope, SCOPES), ("support", self.support, ("student", "target"))):
            if value not in valid:
                raise ValueError(f"router rule {name}={value!r} is not one of {valid}")
        if self.top_k <= 0:
            raise ValueError(f"router rule top_k must be positive, got {self.top_k}")
        if self.weight < 0:
            raise ValueError(f"router rule weight must be >= 0 (0 drops the tokens), got {self.weight}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"router rule beta must lie in [0, 1], got {self.beta}")


@dataclass(frozen=True)
class GapSpec:
    """How the batch thresholds A_bar, qS_bar, qT_bar are computed (paper 2.6; ambiguity 8.1)."""

    trim_top: float = 0.05  # fraction of the largest values dropped before averaging
    trim: str = "all"  # all: trim A, q_S and q_T | gap: trim A only, plain means for q_S and q_T
    normalize: str = "none"  # none: raw values | zscore: per-statistic z-scores (changes only the LH/LL split)
    assign: str = "gap"  # gap: the rule above | random: shuffle the regime labels (same mix, no advantage-awareness)
    # The batch every batch statistic is taken over (these bars, the EOPD/TIP selections' bars, pruning): step is the
    # optimizer step's response tokens, over its loss micro-batches and processes (the paper's batch); micro_batch
    # is each loss micro-batch on its own.
    scope: str = "step"

    def __post_init__(self):
        if self.scope not in SELECTION_SCOPES:
            raise ValueError(f"router.gap.scope={self.scope!r} is not one of {SELECTION_SCOPES}")
        if not 0.0 <= self.trim_top < 1.0:
            raise ValueError(f"router.gap.trim_top must lie in [0, 1), got {self.trim_top}")
        if self.trim not in ("all", "gap"):
            raise ValueError(f"router.gap.trim={self.trim!r} is not one of ('all', 'gap')")
        if self.normalize not in ("none", "zscore"):
            raise ValueError(f"router.gap.normalize={self.normalize!r} is not one of ('none', 'zscore')")
        if self.assign not in ("gap", "random"):
            raise ValueError(f"router.gap.assign={self.assign!r} is not one of ('gap', 'random')")


@dataclass(frozen=True)
class PruneSpec:
    """Drop a fraction of response tokens from the loss (Fig. 4): at random, or those with the lowest/highest A."""

    fraction: float = 0.0
    by: str = "random"

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"router.prune.fraction must lie in [0, 1), got {self.fraction}")
        if self.by not in PRUNE_BY:
            raise ValueError(f"router.prune.by={self.by!r} is not one of {PRUNE_BY}")


@dataclass(frozen=True)
class RouterSpec:
    name: str
    # One entry per group of the grouping named by the keys (see GROUPINGS): a Rule, a tuple of Rules whose losses
    # add up (e.g. EOPD's reverse + forward KL), or None to drop the group's tokens from the loss.
    rules: dict[str, Rule | tuple[Rule, ...] | None]
    student_context: str = "plain"  # plain: train Pi_S(.|x) | privileged: train Pi_S(.|x,p) (Fig. 3 both-privileged)
    gap: GapSpec = field(default_factory=GapSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    temperature: float = 1.0  # loss temperature (sampling temperature is the rollout's own)
    chunk_size: int = 1024  # rows per fp32 chunk of full-vocabulary divergences
    trim_top: float = 0.05  # trimmed-mean thresholds of the entropy and tip groupings

    def __post_init__(self):
        keys = set(self.rules)
        if not any(keys == set(g) for g in GROUPINGS.values()):
            valid = " or ".join("{" + ", ".join(g) + "}" for g in GROUPINGS.values())
            raise ValueError(f"router {self.name!r}: the keys of rules must be exactly one of {valid}; got {sorted(keys)}")
        if self.student_context not in ("plain", "privileged"):
            raise ValueError(f"router.student_context={self.student_context!r} is not one of ('plain', 'privileged')")
        if self.temperature <= 0:
            raise ValueError(f"router.temperature must be > 0, got {self.temperature}")
        if self.chunk_size <= 0:
            raise ValueError(f"router.chunk_size must be > 0, got {self.chunk_size}")

    @property
    def grouping(self) -> str:
        return next(name for name, g in GROUPINGS.items() if set(self.rules) == set(g))

    @property
    def routes(self) -> bool:
        """True when supervision depends on the gap regime, so the gap must be computed."""
        return self.grouping == "gap"

    @property
    def needs_gap(self) -> bool:
        return self.routes or (self.prune.fraction > 0 and self.prune.by != "random")

    def rule_list(self, group: str) -> tuple[Rule, ...]:
        rule = self.rules[group]
        return () if rule is None else (rule,) if isinstance(rule, Rule) else tuple(rule)

    @property
    def passes(self) -> set[str]:
        """The no-grad forward passes this router needs: a subset of TARGETS."""
        need = {r.target for g in self.rules for r in self.rule_list(g)}
        if self.needs_gap:
            need |= {"teacher_priv", "student_priv"}
        if self.grouping in ("entropy", "tip"):
            need.add(self.reference_target)
        return need

    @property
    def group_names(self) -> tuple[str, ...]:
        return GROUPINGS[self.grouping]

    @property
    def selects(self) -> bool:
        """True when which rule a token gets depends on batch statistics (groupings other than `all`, pruning)."""
        return self.grouping != "all" or self.prune.fraction > 0

    @property
    def reference_target(self) -> str:
        """The teacher pass the entropy/tip groupings read: the first rule's target, or the teacher."""
        targets = [r.target for g in self.rules for r in self.rule_list(g)]
        return targets[0] if targets else "teacher"


@dataclass
class Selection:
    """A router's per-token decisions over a set of response tokens (flat, in row-major mask order): which group
    each token's rules come from (an index into `spec.group_names`, -1 pruned), its gap regime (-1 when no gap is
    computed), and the batch statistics they were made with. Made by `select_tokens` over any set of tokens: one
    batch, or a whole optimizer step that is then cut back into its micro-batches with `split`."""

    group: torch.Tensor  # [N] long
    regime: torch.Tensor  # [N] long
    stats: dict[str, float] = field(default_factory=dict)

    def split(self, sizes: list[int]) -> list["Selection"]:
        return [Selection(g, r, self.stats) for g, r in zip(self.group.split(sizes), self.regime.split(sizes))]


@dataclass
class RoutedLoss:
    loss: torch.Tensor  # scalar; gradient only into the student's logits
    token_loss: torch.Tensor  # [B, T] fp32, 0 where masked out
    regime: torch.Tensor  # [B, T] long: 0=LH 1=LL 2=HT 3=HS, -1 masked out or gap not computed
    stats: dict[str, float] = field(default_factory=dict)


# -- gap statistics ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sampled_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], fp32, in row chunks (never a [B, T, V] fp32 copy)."""
    flat, ids = logits.detach().flatten(0, -2), tokens.flatten()
    out = []
    for part, y in zip(flat.split(chunk_size), ids.split(chunk_size)):
        z = part.float() / temperature  # the picked logit minus logsumexp: no [chunk, V] log-softmax
        out.append(z.gather(-1, y[:, None]).squeeze(-1) - z.logsumexp(-1))
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)).view(tokens.shape)


def trimmed_mean(values: torch.Tensor, trim_top: float) -> torch.Tensor:
    """Sort, drop the floor(trim_top * n) largest, average the rest."""
    n = values.numel()
    if n == 0:
        return values.new_tensor(float("nan"))
    drop = int(trim_top * n)
    return values.sort().values[: n - drop].mean()


@dataclass
class Gap:
    log_q_teacher: torch.Tensor  # [B, T]
    log_q_student: torch.Tensor  # [B, T]

    @classmethod
    def from_logits(cls, teacher_priv: torch.Tensor, student_priv: torch.Tensor, tokens: torch.Tensor,
                    temperature: float = 1.0) -> "Gap":
        """The gap of Eq. 1 from the two privileged passes' logits, at the loss temperature: the one place the
        training loss, the Fig. 9 pages and `scripts/regime_anatomy.py` all build it."""
        return cls(sampled_logprob(teacher_priv, tokens, temperature), sampled_logprob(student_priv, tokens, temperature))

    @property
    def advantage(self) -> torch.Tensor:
        return (self.log_q_teacher - self.log_q_student).abs()


def assign_regimes(gap: Gap, mask: torch.Tensor, spec: GapSpec = GapSpec(),
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Regime id per token [B, T] (-1 outside the mask) and the thresholds used, over this batch's tokens."""
    flat, stats = regimes_of(gap.advantage[mask], gap.log_q_student[mask].exp(), gap.log_q_teacher[mask].exp(),
                             spec, generator)
    return torch.full(mask.shape, -1, dtype=torch.long, device=mask.device).masked_scatter(mask, flat), stats


def regimes_of(a: torch.Tensor, q_s: torch.Tensor, q_t: torch.Tensor, spec: GapSpec = GapSpec(),
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The DOPD rule on a flat set of tokens [N] (a batch, or a whole step): regime ids 0=LH 1=LL 2=HT 3=HS and
    the bars A_bar, qS_bar, qT_bar, each the trimmed mean over exactly these tokens."""
    trim_q = spec.trim_top if spec.trim == "all" else 0.0
    a_bar = trimmed_mean(a, spec.trim_top)
    qs_bar, qt_bar = trimmed_mean(q_s, trim_q), trimmed_mean(q_t, trim_q)
    if spec.normalize == "zscore":
        # z-scores with the trimmed set's mean and std; the threshold in z-space is 0 for each statistic.
        high_conf = (_zscore(q_s, q_s, trim_q) + _zscore(q_t, q_t, trim_q)) >= 0
    else:
        high_conf = (q_s + q_t) >= (qs_bar + qt_bar)
    regime = torch.where(a < a_bar, torch.where(high_conf, 0, 1), torch.where(q_t >= q_s, 2, 3))
    if spec.assign == "random":  # same regime mix, labels shuffled across the tokens
        perm = torch.randperm(regime.numel(), generator=generator, device="cpu").to(regime.device)
        regime = regime[perm]
    return regime, {"a_bar": float(a_bar), "qs_bar": float(qs_bar), "qt_bar": float(qt_bar)}


def _zscore(x: torch.Tensor, valid: torch.Tensor, trim_top: float) -> torch.Tensor:
    n = valid.numel()
    kept = valid.sort().values[: n - int(trim_top * n)] if n else valid
    # Equal values are their own mean: kept.mean() may be an ulp off, which / (sd ~ 0) would be a z of order 1.
    mu = torch.where(kept[0] == kept[-1], kept[0], kept.mean()) if kept.numel() else x.new_tensor(0.0)
    sd = kept.std(unbiased=False) if kept.numel() > 1 else x.new_tensor(1.0)
    return (x - mu) / sd.clamp_min(1e-8)


def pruned_keep(n: int, spec: PruneSpec, advantage: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of n tokens [N] stay after dropping floor(fraction * n): at random, or those of highest/lowest A."""
    device = advantage.device if advantage is not None else None
    keep = torch.ones(n, dtype=torch.bool, device=device)
    drop = int(spec.fraction * n)
    if drop == 0:
        return keep
    if spec.by == "random":
        score = torch.rand(n, generator=generator, device="cpu").to(keep.device)
    else:
        if advantage is None:
            raise ValueError("pruning by gap needs the privileged teacher and student passes")
        score = advantage if spec.by == "high_gap" else -advantage
    keep[score.topk(drop).indices] = False
    return keep


# -- which rule each token gets: per-token scores, then a selection over any set of tokens ---------------------
@torch.no_grad()
def token_scores(spec: RouterSpec, tokens: torch.Tensor, student_logits: torch.Tensor | None,
                 targets: dict[str, torch.Tensor | None], gap: Gap | None = None) -> dict[str, torch.Tensor]:
    """The per-token numbers [B, T] a router's selection reads: the gap's two log-probabilities (when both
    privileged passes ran), the teacher's entropy (entropy grouping), the student's entropy and its disagreement
    with the reference teacher at the sampled token (tip grouping). Small: what a step keeps of its passes to
    select over all of its tokens at once. `gap`: the privileged gap if the caller already has it."""
    out = {}
    gap = gap or _privileged_gap(spec, tokens, targets)
    if gap is not None:
        out.update(log_q_teacher=gap.log_q_teacher, log_q_student=gap.log_q_student)
    if spec.grouping == "entropy":
        out["teacher_entropy"] = token_entropy(targets[spec.reference_target])
    if spec.grouping == "tip":
        ref = targets[spec.reference_target]
        out["student_entropy"] = token_entropy(student_logits)
        out["disagree"] = (sampled_logprob(ref, tokens, spec.temperature)
                           - sampled_logprob(student_logits, tokens, spec.temperature)).abs()
    return out


def _privileged_gap(spec: RouterSpec, tokens: torch.Tensor, targets: dict) -> Gap | None:
    """Eq. 1's two log-probabilities when both privileged passes ran, else None."""
    if targets.get("teacher_priv") is None or targets.get("student_priv") is None:
        return None
    return Gap.from_logits(targets["teacher_priv"], targets["student_priv"], tokens, spec.temperature)


@torch.no_grad()
def select_tokens(spec: RouterSpec, scores: dict[str, torch.Tensor], n: int,
                  generator: torch.Generator | None = None) -> Selection:
    """The router's decisions over n tokens from their flat scores [N] (`token_scores` at the masked positions):
    regimes with the bars of exactly these tokens, then pruning, then the grouping's own selection."""
    device = next(iter(scores.values())).device if scores else None
    stats: dict[str, float] = {}
    regime = torch.full((n,), -1, dtype=torch.long, device=device)
    has_gap = "log_q_teacher" in scores
    advantage = (scores["log_q_teacher"] - scores["log_q_student"]).abs() if has_gap else None
    if has_gap and n:
        regime, thresholds = regimes_of(advantage, scores["log_q_student"].exp(), scores["log_q_teacher"].exp(),
                                        spec.gap, generator)
        stats.update({f"gap/{k}": v for k, v in thresholds.items()})
    keep = pruned_keep(n, spec.prune, advantage, generator)
    grouping = spec.grouping
    if grouping == "all":
        group = torch.zeros(n, dtype=torch.long, device=keep.device)
    elif grouping == "gap":
        group = regime.clone()
    elif grouping == "entropy":
        # EOPD reading: tokens where the teacher is uncertain (entropy >= its trimmed batch mean) get extra rules.
        h_t = scores["teacher_entropy"]
        bar = trimmed_mean(h_t[keep], spec.trim_top)
        stats["select/teacher_entropy_bar"] = float(bar)
        group = (h_t >= bar).long()  # 0 low_entropy, 1 high_entropy
    else:
        # TIP reading: a token matters when the student is uncertain or disagrees with the teacher at the sampled token.
        h_s, dis = scores["student_entropy"], scores["disagree"]
        selected = (h_s >= trimmed_mean(h_s[keep], spec.trim_top)) | (dis >= trimmed_mean(dis[keep], spec.trim_top))
        stats["select/frac"] = float((selected & keep).sum() / keep.sum().clamp_min(1))
        group = (~selected).long()  # 0 selected, 1 rest
    return Selection(group.masked_fill(~keep, -1), regime, stats)


# -- the engine -------------------------------------------------------------------------------------------------
def routed_loss(spec: RouterSpec, student_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *,
                teacher: torch.Tensor | None = None, teacher_priv: torch.Tensor | None = None,
                student_priv: torch.Tensor | None = None, generator: torch.Generator | None = None,
                selection: Selection | None = None, n_sequences: int | None = None) -> RoutedLoss:
    """Execute a router on one batch. Logits [B, T, V] with [:, t] predicting tokens[:, t]; mask [B, T] bool.

    `selection` (default: made over this batch's own tokens) is the rule each masked token gets, when it was made
    over a larger batch (the optimizer step's, `router.gap.scope=step`). `n_sequences` (default: this batch's) is
    the number of sequences Eq. 11 averages over: with the step's count, the micro-batches' losses add up to the
    step's loss, and so do their gradients.
    """
    mask = mask.bool()
    # Masked-out positions may carry any id (e.g. -100 labels); they never reach the loss, so gather at id 0 there.
    tokens = tokens.masked_fill(~mask, 0)
    targets = {"teacher": teacher, "teacher_priv": teacher_priv, "student_priv": student_priv}
    for name in spec.passes:
        if targets[name] is None:
            raise ValueError(f"router {spec.name!r} needs the {name} logits")
        if targets[name].shape != student_logits.shape:
            raise ValueError(f"{name} logits have shape {tuple(targets[name].shape)}, the student's "
                             f"{tuple(student_logits.shape)}: passes are not aligned")
    gap = _privileged_gap(spec, tokens, targets)  # for the figures; the selection reads it too when it is made here
    if selection is None:
        scores = token_scores(spec, tokens, student_logits, targets, gap)
        selection = select_tokens(spec, {k: v[mask] for k, v in scores.items()}, int(mask.sum()), generator)
    unset = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    regime, group = unset.masked_scatter(mask, selection.regime), unset.masked_scatter(mask, selection.group)
    groups = {name: group == i for i, name in enumerate(spec.group_names)}
    stats: dict[str, float] = dict(selection.stats)

    token_loss = torch.zeros(mask.shape, dtype=torch.float32, device=student_logits.device)
    active = {name: sel for name, sel in groups.items()
              if any(rule.weight != 0 for rule in spec.rule_list(name)) and sel.any()}
    index = {name: sel.flatten().nonzero().squeeze(1) for name, sel in active.items()}  # one host sync per group
    readers = {t: {name: index[name] for name in active
                   if any(rule.target == t and rule.weight != 0 for rule in spec.rule_list(name))} for t in targets}
    rows = {"student": _group_rows(index, student_logits), "tokens": _group_rows(index, tokens),
            **{t: _group_rows(readers[t], targets[t]) for t in targets if readers[t]}}
    for name, sel in active.items():
        for rule in spec.rule_list(name):
            if rule.weight == 0:
                continue
            values = divergence(
                rows["student"][name], rows[rule.target][name], rows["tokens"][name], divergence=rule.divergence,
                scope=rule.scope, beta=rule.beta, top_k=rule.top_k, support=rule.support, tail=rule.tail,
                temperature=spec.temperature, chunk_size=spec.chunk_size,
            )
            token_loss = token_loss.index_put((sel,), (rule.weight * values).float(), accumulate=True)

    # Eq. 11: each sequence's mean over its response tokens (1/|y|), then the mean over sequences that have any.
    lengths = mask.sum(-1)
    has = lengths > 0
    if has.any():
        per_seq = token_loss.sum(-1)[has] / lengths[has]
        loss = per_seq.mean() if n_sequences is None else per_seq.sum() / n_sequences
    else:
        # An empty fp32 sum: 0 with a graph (backward() and DDP still work), fp32 and finite whatever the logits.
        loss = student_logits[..., :0].float().sum()
    stats.update(_regime_stats(regime, token_loss, mask, gap))
    return RoutedLoss(loss=loss, token_loss=token_loss, regime=regime, stats=stats)


def _group_rows(index: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each group's rows of a [B, T, ...] tensor, given each group's flat [B * T] positions in ascending order.

    One gather of all the groups' rows, then a split: the student's gradient is scattered back once, where a
    boolean index per group would allocate and scatter a [B, T, V] gradient per group. A single group that
    selects every position is a view.
    """
    if not index:
        return {}
    names, flat = list(index), x.flatten(0, 1)
    sizes = [len(index[n]) for n in names]
    if len(names) == 1 and sizes[0] == flat.shape[0]:
        return {names[0]: flat}
    return dict(zip(names, flat.index_select(0, torch.cat([index[n] for n in names])).split(sizes)))


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per position, [B, T], in fp32 row chunks."""
    flat = logits.detach().flatten(0, -2)
    out = torch.cat([_entropy_rows(part) for part in flat.split(chunk_size)]) if flat.shape[0] else flat.new_zeros(0)
    return out.view(logits.shape[:-1])


def _entropy_rows(rows: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(rows.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _regime_stats(regime, token_loss, mask, gap) -> dict[str, float]:
    n = int(mask.sum())
    if n == 0 or gap is None:
        return {}
    out = {}
    tl = token_loss.detach()
    for i, r in enumerate(REGIMES):
        sel = regime == i
        k = int(sel.sum())
        out[f"regime/{r}/frac"] = k / n
        out[f"regime/{r}/loss"] = float(tl[sel].mean()) if k else 0.0
    a = gap.advantage[mask]
    for q in (0.1, 0.5, 0.9):
        out[f"gap/A_q{int(q * 100)}"] = float(a.quantile(q))
    out["gap/A_mean"] = float(a.mean())
    out["gap/q_student"] = float(gap.log_q_student[mask].exp().mean())
    out["gap/q_teacher"] = float(gap.log_q_teacher[mask].exp().mean())
    return out


# -- the DOPD preset and the paper's reusable contract ----------------------------------------------------------
def dopd_spec(top_k: int = 128, beta_light: float = 0.6, beta_weak: float = 0.3, trim_top: float = 0.05,
              name: str = "dopd") -> RouterSpec:
    light_t = Rule("teacher_priv", "rkl", "topk", beta_light, top_k=top_k)
    return RouterSpec(
        name=name,
        rules={
            "LH": light_t,
            "LL": replace(light_t, target="student_priv", weight=beta_weak),
            "HT": Rule("teacher_priv", "js", "full", 1.0, beta=0.5),
            "HS": replace(light_t, target="student_priv"),
        },
        gap=GapSpec(trim_top=trim_top),
    )


def dopd_loss(student_logits: torch.Tensor, priv_student_logits: torch.Tensor, priv_teacher_logits: torch.Tensor,
              tokens: torch.Tensor, mask: torch.Tensor, *, top_k: int = 128, beta_light: float = 0.6,
              beta_weak: float = 0.3, trim_top: float = 0.05) -> RoutedLoss:
    """DOPD's loss for use inside any trainer. Returns `.loss`, `.token_loss` [B,T] and `.regime` [B,T].

    `student_logits` come from the student without p (with grad); the two privileged logits from the student and
    the frozen teacher with p (their gradients are never used). All three are [B, T, V] with [:, t] predicting
    `tokens[:, t]`; `mask` [B, T] marks response tokens. Computed in fp32 whatever the input dtype.
    """
    spec = dopd_spec(top_k=top_k, beta_light=beta_light, beta_weak=beta_weak, trim_top=trim_top)
    return routed_loss(spec, student_logits, tokens, mask, teacher_priv=priv_teacher_logits,
                       student_priv=priv_student_logits)
