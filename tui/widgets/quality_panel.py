"""Quality panel: how good the current model is on the eval suite, and what the newest file did to it.

A summary line over two tables: by source (the current model's eval loss; the
newest version's loss before and after its file, with the change), and the
forgetting matrix by version, newest first (`*` current, `H` held by the
quality gate), each cell a loss and its change against the version before.
A change is in the alert colour where the gate would refuse it (forgetting past
`eval.max_forgetting`, or no improvement on the file's own lines) and in the
good colour where the model learned. The data comes from
`tui.quality.QualityReader` in the listing thread; `show` only draws.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.quality.gate import percent
from tui.quality import VERDICT_STYLE, by_source, verdict

VERSIONS_SHOWN = 50  # newest first; older versions are `traind quality`'s
CURRENT, HELD = ("*", "bold cyan"), ("H", "bold yellow")
EMPTY = "no evaluated model version yet: each file is evaluated once eval.holdout_fraction > 0"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class QualityPanel(Vertical):
    """The summary line, the by-source table and the matrix; hidden until `e` shows it in the chart's place."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.doc: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static(EMPTY, id="quality-summary")
        # No cursor: a highlighted row would hide its cells' colours; arrows still scroll.
        yield DataTable(id="quality-sources", cursor_type="none", zebra_stripes=False)
        yield DataTable(id="quality-versions", cursor_type="none", zebra_stripes=False)

    def on_mount(self) -> None:
        self.border_title = "Quality"
        self.summary = self.query_one("#quality-summary", Static)
        self.sources = self.query_one("#quality-sources", DataTable)
        self.versions = self.query_one("#quality-versions", DataTable)

    def show(self, doc: dict[str, Any] | None) -> None:
        if doc is None or doc == self.doc:  # polled: redraw only what changed
            return
        self.doc = doc
        self.border_subtitle = (f"gate {doc['gate']} · forgetting ≤ {doc['max_forgetting']:.0%} · "
                                f"{CURRENT[0]} current · {HELD[0]} held")
        self.summary.update(self._summary(doc))
        self._show_sources(doc)
        self._show_versions(doc)

    def _summary(self, doc: dict[str, Any]) -> Text:
        rows = doc["matrix"]["versions"]
        line = Text()
        line.append("current ", "dim")
        line.append(doc["current"] or "not a version under models/", CURRENT[1])
        if rows:
            newest = rows[-1]
            line.append(" · newest ", "dim")
            line.append(newest["version"], "bold")
            if newest["held"]:
                line.append(" held by the quality gate", HELD[1])
            elif not newest["current"]:
                line.append(" (not current)", "dim")
            if len(rows) > VERSIONS_SHOWN:
                line.append(f" · the newest {VERSIONS_SHOWN} of {len(rows)} versions below", "dim")
        else:
            line = Text(EMPTY, "dim")
        if doc.get("config_problem"):
            line.append(f"\nthresholds are the defaults: {doc['config_problem']}", "yellow")
        return line

    def _show_sources(self, doc: dict[str, Any]) -> None:
        table = self.sources
        table.clear(columns=True)
        table.add_columns("source", "current", "before", "after", "change")
        for row in by_source(doc):
            name = Text(row["source"], "bold" if row["own"] else "")
            if row["own"]:
                name.append(" (own)", "dim")
            table.add_row(name, _loss(row["current"]), _loss(row["before"]), _loss(row["after"]),
                          Text(percent(row["change"]), VERDICT_STYLE[row["verdict"]]), key=row["source"])

    def _show_versions(self, doc: dict[str, Any]) -> None:
        table = self.versions
        sources = doc["matrix"]["sources"]
        rows = doc["matrix"]["versions"][::-1][:VERSIONS_SHOWN]
        table.clear(columns=True)
        table.add_column("", key="mark")
        table.add_column("version", key="version")
        for source in sources:
            table.add_column(source, key=source)
        for row in rows:
            mark, style = CURRENT if row["current"] else HELD if row["held"] else (" ", "")
            cells: list[Any] = [Text(mark, style), Text(row["version"], style)]
            for source in sources:
                loss, moved = row["losses"].get(source), row["changes"].get(source)
                if loss is None:
                    cells.append(Text("-", "dim"))
                    continue
                judged = verdict(moved, source, row.get("own"), doc)
                cells.append(Text(f"{loss:.3f} {percent(moved)}".rstrip(), VERDICT_STYLE[judged]))
            table.add_row(*cells, key=row["version"])
