"""HTML/Markdown/table renderings of results, kept free of gradio so they are plain-testable."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qvlm.evaluation.compare import TokenComparison


@dataclass(frozen=True)
class AnswerCard:
    model: str
    kind: str  # "fp" | "variant" | "error"
    text: str
    seconds: float | None
    detail: str = ""
    flipped: bool = False
    """A variant whose answer differs from the FP model's (shown with a "flipped" badge)."""


_BORDER = {"fp": "#444444", "variant": "#4C78A8", "error": "#E45756"}
_ROW = "display:flex;flex-wrap:wrap;gap:12px;"
_CARD = "flex:1 1 180px;border:2px solid {color};border-radius:10px;padding:10px 14px;"
_SMALL = "font-size:0.85em;opacity:0.75;"
_ANSWER = "font-size:1.5em;font-weight:600;margin:4px 0;"
_BADGE = "font-size:0.55em;background:#E45756;color:white;border-radius:8px;padding:2px 7px;vertical-align:middle;"
_CELL = "padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top;"


def answers_html(cards: Sequence[AnswerCard], expected: str | None = None, source: str = "easy-VQA") -> str:
    """Side-by-side answer cards (a flex row that wraps on a phone), FP first.

    ``expected``: the reference answer of ``source`` (the task the image and question come from), when known.

    Styles are inline because Gradio 6 takes custom CSS only at ``launch()``, which
    ``app.py`` should not have to know about.
    """
    if not cards:
        return f"<div id='answers-empty' style='{_SMALL}'>Answers appear here.</div>"
    items = []
    for card in cards:
        latency = f"{card.seconds * 1000:.0f} ms" if card.seconds is not None else ""
        mark = ""
        if expected and card.kind != "error":
            ok = card.text.strip().lower().split()[:1] == [expected.lower()]
            mark = f" <span title='matches the {source} answer'>✓</span>" if ok else \
                f" <span title='differs from the {source} answer'>✗</span>"
        detail = f"<div style='{_SMALL}'>{html.escape(card.detail)}</div>" if card.detail else ""
        if card.flipped:
            mark += (" <span class='qvlm-flipped' title='this answer differs from the FP model&#39;s' "
                     f"style='{_BADGE}'>flipped</span>")
        items.append(
            f"<div class='qvlm-card qvlm-{card.kind}' data-model='{html.escape(card.model, quote=True)}' "
            f"style='{_CARD.format(color=_BORDER.get(card.kind, '#ccc'))}'>"
            f"<div class='qvlm-card-model' style='{_SMALL}'>{html.escape(card.model)}</div>"
            f"<div class='qvlm-card-answer' style='{_ANSWER}'>{html.escape(card.text) or '<i>(empty answer)</i>'}{mark}</div>"
            f"<div class='qvlm-card-latency' style='{_SMALL}'>{latency}</div>{detail}</div>"
        )
    footer = (
        f"<div class='qvlm-expected' style='{_SMALL}margin-top:6px;'>{html.escape(source)} reference answer: "
        f"<b>{html.escape(expected)}</b></div>" if expected else ""
    )
    return f"<div id='answers-row' class='qvlm-answers' style='{_ROW}'>{''.join(items)}</div>{footer}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def variants_markdown(rows: Sequence[tuple[str, float, int]], budget_bytes: int, max_variants: int) -> str:
    """The list of held variants under the Quantize panel: label, time it took, memory."""
    if not rows:
        return f"*No quantized variant held yet (this session keeps up to {max_variants}).*"
    total = sum(b for _, _, b in rows)
    lines = [f"**Held variants** ({len(rows)}/{max_variants}, {human_bytes(total)} of {human_bytes(budget_bytes)}; "
             "the least recently used is dropped beyond that):"]
    lines += [f"- `{label}` · quantized in {sec:.1f} s · {human_bytes(b)}" for label, sec, b in rows]
    return "\n".join(lines)


def _top_html(top: Sequence[tuple[str, float]], chosen: str | None = None) -> str:
    """"circle 0.97 · triangle 0.02 ...", the token FP chose in bold."""
    parts = []
    for token, p in top:
        text = f"{html.escape(token)}&nbsp;{p:.3f}"
        parts.append(f"<b>{text}</b>" if token == chosen else text)
    return " · ".join(parts)


def token_table_html(comparison: TokenComparison | None) -> str:
    """One row per step of FP's answer: FP's token and top-k, then each variant's top-k and KL(FP‖variant).

    A variant's first step whose top token is not FP's is shaded red; its header says where that is and
    whether its own answer flipped. ``comparison`` is :func:`qvlm.evaluation.compare.token_comparison`'s result.
    """
    if comparison is None or not comparison.tokens:
        return f"<div id='tokens-empty' style='{_SMALL}'>Ask a question to compare the models token by token.</div>"
    variants = comparison.variants
    head = [f"<th style='{_CELL}'>step</th>", f"<th style='{_CELL}'>FP token</th>",
            f"<th style='{_CELL}'>FP top-{len(comparison.fp_top[0])}</th>"]
    for label, v in variants.items():
        where = "same top token at every step" if v.first_diff is None else f"first differs at step {v.first_diff}"
        badge = f" <span class='qvlm-flipped' style='{_BADGE}'>flipped</span>" if v.flipped else ""
        head.append(f"<th style='{_CELL}'>{html.escape(label)}{badge}<br><span style='{_SMALL}'>{where}</span></th>")
        head.append(f"<th style='{_CELL}'>KL(FP‖{html.escape(label)})</th>")
    rows = []
    for j, token in enumerate(comparison.tokens):
        cells = [f"<td style='{_CELL}'>{j}</td>", f"<td style='{_CELL}'><b>{html.escape(token)}</b></td>",
                 f"<td style='{_CELL}'>{_top_html(comparison.fp_top[j], token)}</td>"]
        for v in variants.values():
            shade = "background:#fde2e1;" if v.first_diff == j else ""
            cells.append(f"<td style='{_CELL}{shade}'>{_top_html(v.top[j], token)}</td>")
            cells.append(f"<td style='{_CELL}{shade}'>{v.kl[j]:.3g}</td>")
        rows.append(f"<tr class='qvlm-token-step'>{''.join(cells)}</tr>")
    return (f"<table id='token-table' class='qvlm-tokens' style='border-collapse:collapse;font-size:0.9em;'>"
            f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def vocabulary_hint_markdown(hint: dict | None, task_note: str) -> str:
    """What the model knows, for a question outside its task (:func:`qvlm.evaluation.compare.vocabulary_hint`); "" when inside.

    ``task_note``: the task's sentence, with ``{n}`` and ``{answers}`` for its answer set (``texts.TASK_HINTS``).
    """
    if not hint:
        return ""
    lines = []
    if hint["unknown"]:
        words = ", ".join(f"'{html.escape(w)}'" for w in hint["unknown"])  # the user's words: never markup
        lines.append(f"ℹ The model's tokenizer does not know {words}: it reads each as its unknown token.")
    if hint["outside"]:
        said = ", ".join(f"'{html.escape(a)}'" for a in hint["outside"])
        lines.append(f"ℹ The answer {said} is not one of the task's answers.")
    answers = ", ".join(html.escape(a) for a in hint["known_answers"])
    lines.append(task_note.format(n=len(hint["known_answers"]), answers=answers))
    return "\n\n".join(lines)
