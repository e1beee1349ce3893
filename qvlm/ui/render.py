"""HTML/Markdown/table renderings of results, kept free of gradio so they are plain-testable."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerCard:
    model: str
    kind: str  # "fp" | "variant" | "error"
    text: str
    seconds: float | None
    detail: str = ""


_BORDER = {"fp": "#444444", "variant": "#4C78A8", "error": "#E45756"}
_ROW = "display:flex;flex-wrap:wrap;gap:12px;"
_CARD = "flex:1 1 180px;border:2px solid {color};border-radius:10px;padding:10px 14px;"
_SMALL = "font-size:0.85em;opacity:0.75;"
_ANSWER = "font-size:1.5em;font-weight:600;margin:4px 0;"


def answers_html(cards: Sequence[AnswerCard], expected: str | None = None) -> str:
    """Side-by-side answer cards (a flex row that wraps on a phone), FP first.

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
            mark = " <span title='matches the easy-VQA answer'>✓</span>" if ok else \
                " <span title='differs from the easy-VQA answer'>✗</span>"
        detail = f"<div style='{_SMALL}'>{html.escape(card.detail)}</div>" if card.detail else ""
        items.append(
            f"<div class='qvlm-card qvlm-{card.kind}' data-model='{html.escape(card.model, quote=True)}' "
            f"style='{_CARD.format(color=_BORDER.get(card.kind, '#ccc'))}'>"
            f"<div class='qvlm-card-model' style='{_SMALL}'>{html.escape(card.model)}</div>"
            f"<div class='qvlm-card-answer' style='{_ANSWER}'>{html.escape(card.text) or '<i>(empty answer)</i>'}{mark}</div>"
            f"<div class='qvlm-card-latency' style='{_SMALL}'>{latency}</div>{detail}</div>"
        )
    footer = (
        f"<div class='qvlm-expected' style='{_SMALL}margin-top:6px;'>easy-VQA reference answer: "
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
