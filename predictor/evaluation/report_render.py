"""The report's two renderings of one list of sections: Markdown (for diffs in git) and a self-contained
HTML page from the Jinja2 template in `templates/`.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from speckv.predictor.evaluation.report_tables import Figure, Section, Table

TEMPLATE = "report.html.j2"
TITLE = "SpecKV: does the learned gamma predictor pay?"


def _md_table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|---" * len(table.columns) + "|")
    lines += ["| " + " | ".join(c.text for c in row) + " |" for row in table.rows]
    return lines


def render_markdown(verdict_sentence: str, sections: list[Section]) -> str:
    """The report as Markdown: the verdict on line 3, then each section; figures as links to their PNGs."""
    md = [f"# {TITLE}", "", verdict_sentence, ""]
    for section in sections:
        md += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                md += [*_md_table(block), ""]
            elif isinstance(block, Figure):
                md += [f"![{block.title}]({block.name})", ""]
            elif isinstance(block, list):
                md += [*(f"- {item}" for item in block), ""]
            else:
                md += [block, ""]
    return "\n".join(md).rstrip() + "\n"


def inline_markdown(text: str) -> Markup:
    """`code` and **bold** as HTML, everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return Markup(out)


def render_html(verdict_: tuple[str, str], sections: list[Section]) -> str:
    """The report as one self-contained page: tables as <table>, plots as inline data: URIs (works offline)."""
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True, trim_blocks=True
    )
    env.filters["md"] = inline_markdown
    env.filters["data_uri"] = lambda png: "data:image/png;base64," + base64.b64encode(png).decode()
    env.tests["table"] = lambda block: isinstance(block, Table)
    env.tests["figure"] = lambda block: isinstance(block, Figure)
    env.tests["bullets"] = lambda block: isinstance(block, list)
    tone, sentence = verdict_
    return env.get_template(TEMPLATE).render(title=TITLE, tone=tone, verdict=sentence, sections=sections)
