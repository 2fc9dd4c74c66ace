"""See the routing (paper Fig. 9): sampled responses with every token coloured by its regime.

`regime_html` writes a self-contained page (hover a token for A, q_S, q_T and its loss); `regime_png` draws the
same rows with matplotlib. Colours follow the paper: LH yellow, LL grey, HT green, HS blue.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

REGIME_COLOURS = {0: "#f6d55c", 1: "#c8c8c8", 2: "#6cc070", 3: "#6fa8dc", -1: "#ffffff"}
REGIME_NAMES = {0: "LH", 1: "LL", 2: "HT", 3: "HS", -1: "-"}


@dataclass
class TokenRow:
    prompt: str
    tokens: list[str]
    regime: list[int]
    gap: list[float]
    q_student: list[float]
    q_teacher: list[float]
    loss: list[float]
    correct: bool | None = None


def rows_from_batch(prompts, token_strs, regime, gap, q_s, q_t, token_loss, mask, correct=None) -> list[TokenRow]:
    rows = []
    for i, prompt in enumerate(prompts):
        n = int(mask[i].sum())
        rows.append(TokenRow(prompt, token_strs[i][:n], regime[i, :n].tolist(), gap[i, :n].tolist(),
                             q_s[i, :n].tolist(), q_t[i, :n].tolist(), token_loss[i, :n].tolist(),
                             None if correct is None else bool(correct[i])))
    return rows


def regime_html(rows: list[TokenRow], title: str = "DOPD routing") -> str:
    legend = "".join(f'<span class="t" style="background:{REGIME_COLOURS[k]}">{REGIME_NAMES[k]}</span> '
                     for k in (0, 1, 2, 3))
    body = []
    for row in rows:
        spans = []
        for tok, r, a, qs, qt, lo in zip(row.tokens, row.regime, row.gap, row.q_student, row.q_teacher, row.loss):
            tip = f"{REGIME_NAMES[r]}  A={a:.3f}  q_S={qs:.3f}  q_T={qt:.3f}  loss={lo:.4f}"
            shown = html.escape(tok).replace("\n", "&#9166;") or "&#8709;"
            spans.append(f'<span class="t" style="background:{REGIME_COLOURS[r]}" title="{html.escape(tip)}">{shown}</span>')
        mark = "" if row.correct is None else (" &#10003;" if row.correct else " &#10007;")
        body.append(f'<div class="row"><div class="p">{html.escape(row.prompt)}{mark}</div>{"".join(spans)}</div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:monospace;margin:1.5em} .t{padding:1px 1px;margin:0 1px;border-radius:2px;white-space:pre}"
            ".row{margin:.6em 0} .p{color:#555;font-size:.85em}</style></head><body>"
            f"<h3>{html.escape(title)}</h3><p>{legend} (hover a token for its gap, confidences and loss)</p>"
            f"{''.join(body)}</body></html>")


def regime_png(rows: list[TokenRow], path: str, title: str = "DOPD routing") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    width = max([len(r.tokens) for r in rows] + [1])
    fig, ax = plt.subplots(figsize=(min(24, 0.22 * width + 2), 0.45 * len(rows) + 1.2))
    for y, row in enumerate(rows):
        for x, (tok, r) in enumerate(zip(row.tokens, row.regime)):
            ax.add_patch(plt.Rectangle((x, -y - 0.45), 0.95, 0.9, color=REGIME_COLOURS[r]))
            ax.text(x + 0.47, -y, tok.replace("\n", "\\n"), ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=REGIME_COLOURS[k], label=REGIME_NAMES[k]) for k in (0, 1, 2, 3)],
              loc="upper right", bbox_to_anchor=(1, 1.25), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def routing_page(folder: Path, router_name: str, step: int, prompts, tokenizer, tokens, regime, gap, q_s, q_t,
                 token_loss, mask, correct=None) -> Path:
    """Fig. 9 for one evaluation (`DistillModule.log_routing`): the sampled rows, each token decoded alone, written to
    `folder/routing_step<step>.html` and the same rows to its `.png`; returns the HTML page's path."""
    table = rows_from_batch(prompts, token_strings(tokenizer, tokens), regime, gap, q_s, q_t, token_loss, mask, correct)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{router_name} step {step}: token regimes (LH yellow, LL grey, HT green, HS blue)"
    page = folder / f"routing_step{step:05d}.html"
    page.write_text(regime_html(table, title))
    regime_png(table, str(page.with_suffix(".png")), title)
    return page


def token_strings(tokenizer, tokens: torch.Tensor) -> list[list[str]]:
    return [[tokenizer.decode([t]) for t in row.tolist()] for row in tokens]
