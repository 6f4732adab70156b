"""GPU panel: per device memory as a bar, utilisation, temperature, power, the worker's share.

In CPU mode (no driver, no device) it shows the worker's RSS and the machine's
memory instead, labelled as such. With several machines (`[distributed] nodes`)
a line each names them with their ranks and state; a sharded job's method and
ranks are in the title ("fsdp ×8"). Draws from `status["resources"]`,
`status["nodes"]` and the job's `sharding` only, sized to its own width (bars
shrink, the least useful text goes first).
"""

from __future__ import annotations

import textwrap
from typing import Any

from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget

from engine.core.resources import format_bytes

COMPACT_FROM = 3  # devices: from this many, one line each (eight fit beside the chart at 160x48)


def bar(fraction: float, width: int, marks: dict[int, str] | None = None) -> Text:
    """A bar of `width` cells filled to `fraction`, green/yellow/red by fill; `marks` put a character at a cell."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    style = "green" if fraction < 0.75 else "yellow" if fraction < 0.9 else "red"
    cells = [("█", style) if i < filled else ("░", "dim") for i in range(width)]
    for pos, char in (marks or {}).items():
        if 0 <= pos < width:
            cells[pos] = (char, "bold magenta")
    return Text.assemble(*cells)


def used_of(used: int, total: int) -> str:
    """"61.3/80.0 GiB" when both share a unit, else "512.0 MiB/80.0 GiB"."""
    u, t = format_bytes(used), format_bytes(total)
    return f"{u.split()[0]}/{t}" if u.split()[-1] == t.split()[-1] else f"{u}/{t}"


def bar_line(label: str, fraction: float, suffix: str, width: int, marks: dict[int, str] | None = None) -> Text:
    """label, a bar as wide as the room left, suffix: one line of `width` cells."""
    room = width - len(label) - len(suffix) - 1
    return Text.assemble((label, "bold"), bar(fraction, max(4, min(room, 30)), marks), " " + suffix)


def joined(lines: list[Text]) -> Text:
    """Lines as one Text that never wraps: a panel's height is its line count."""
    text = Text("\n").join(lines)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def repaint(widget: Widget, before: list[Text] | None, after: list[Text]) -> None:
    """Refresh `widget` for new lines: not at all when they are the same, with a layout pass only
    when their number changed (a reflow of the whole screen costs more than the panel's paint)."""
    if before != after:
        widget.refresh(layout=before is None or len(before) != len(after))


def compact_line(d: dict[str, Any], width: int) -> Text:
    """One device in one line: index, memory bar, used/total GiB, utilisation, temperature, power."""
    label = f"{d.get('index')} "
    if d.get("error"):
        return _line((label, "bold"), (d["error"], "bold red"))
    total, used = d.get("memory_total") or 0, d.get("memory_used") or 0
    stats = " ".join([f"{used / 2**30:.0f}/{total / 2**30:.0f}G" if total else "-",
                      f"{d['utilization_percent']:>3}%" if d.get("utilization_percent") is not None else "   -",
                      f"{d['temperature_c']}°" if d.get("temperature_c") is not None else "-",
                      f"{d['power_w']:.0f}W" if d.get("power_w") is not None else "-"])
    room = max(4, min(width - len(label) - len(stats) - 1, 30))
    return _line((label, "bold"), bar(used / total if total else 0.0, room), " " + stats)


def node_line(row: dict[str, Any]) -> Text:
    """One machine of a job on several: its name, ranks (while an attempt runs) and state."""
    ranks = f"ranks {row['ranks'][0]}-{row['ranks'][1]} " if row.get("ranks") else ""
    style = "green" if row["state"] in ("running", "idle") else "yellow"
    return _line((f"{row['name']} ", "bold"), (f"{row['role']} ", "dim"), ranks, (row["state"], style))


def _line(*parts: Any) -> Text:
    text = Text.assemble(*parts)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


class GpuPanel(Widget):
    """Accelerator memory, or host memory in CPU mode."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resources: dict[str, Any] | None = None
        self.nodes: list[dict[str, Any]] | None = None

    def show(self, resources: dict[str, Any], nodes: list[dict[str, Any]] | None = None,
             sharding: dict[str, Any] | None = None) -> None:
        """New resource figures; repaints only if what shows changed, reflows only if its height did. `sharding` is
        the job's (status job.sharding): its method and ranks go in the title, beside the devices they divide."""
        width = max(20, self.content_size.width)
        before = self.lines(self.resources, width, self.nodes) if self.resources is not None else None
        self.resources, self.nodes = resources, nodes
        title = self.title(resources) + (f" · {len(nodes)} nodes" if nodes else "")
        if sharding:
            title += f" · {sharding.get('method')} ×{sharding.get('ranks')}"
        if title != self.border_title:
            self.border_title = title
        repaint(self, before, self.lines(resources, width, nodes))

    def render(self) -> Text:
        if self.resources is None:
            return Text("no resource data yet", "dim")
        lines = self.lines(self.resources, max(20, self.content_size.width), self.nodes)
        room = self.content_size.height
        if 0 < room < len(lines):  # held to a max-height: say what does not fit instead of cutting silently
            lines = lines[: room - 1] + [Text(f"… {len(lines) - room + 1} more: taller terminal", "dim italic")]
        return joined(lines)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        """Every line: the height the panel would like, whatever it was given last time."""
        if self.resources is None:
            return 1
        return len(self.lines(self.resources, max(20, width), self.nodes))

    @staticmethod
    def title(resources: dict[str, Any]) -> str:
        gpu = resources.get("gpu") or {}
        if gpu.get("mode") != "gpu":
            return "CPU mode"
        devices = gpu.get("devices") or []
        names = {(d.get("name") or "?").removeprefix("NVIDIA ") for d in devices}
        if len(devices) >= COMPACT_FROM and len(names) == 1:  # one line a device has no room for the name
            return f"GPU ×{len(devices)} {names.pop()}"
        return f"GPU ×{len(devices)}"

    @staticmethod
    def lines(resources: dict[str, Any], width: int, nodes: list[dict[str, Any]] | None = None) -> list[Text]:
        gpu = resources.get("gpu") or {}
        out: list[Text] = []
        devices = gpu.get("devices") or []
        if gpu.get("mode") == "gpu" and len(devices) >= COMPACT_FROM:
            out.extend(compact_line(d, width) for d in devices)
            worker = sum(d.get("worker_memory") or 0 for d in devices)
            if worker:
                out.append(_line(("worker ", "dim"), f"{format_bytes(worker)} on {len(devices)} devices"))
        elif gpu.get("mode") == "gpu":
            for d in devices:
                name = f"{d.get('index')} {(d.get('name') or '?').removeprefix('NVIDIA ')}"
                if d.get("error"):
                    out.append(_line((name, "bold"), "  ", (d["error"], "bold red")))
                    continue
                stats = [f"{d['utilization_percent']}%" if d.get("utilization_percent") is not None else None,
                         f"{d['temperature_c']}°C" if d.get("temperature_c") is not None else None,
                         (f"{d['power_w']:.0f}/{d['power_limit_w']:.0f}W" if d.get("power_limit_w") else f"{d['power_w']:.0f}W")
                         if d.get("power_w") is not None else None]
                stat_text = " ".join(s for s in stats if s)
                out.append(_line((name[: max(8, width - len(stat_text) - 1)], "bold"), " ", stat_text))
                if d.get("memory_total"):
                    used = d.get("memory_used") or 0
                    worker = f" · worker {format_bytes(d['worker_memory'])}" if d.get("worker_memory") and width >= 44 else ""
                    out.append(_line(bar_line("", used / d["memory_total"], used_of(used, d["memory_total"]) + worker, width)))
                if d.get("worker_memory") and width < 44:
                    out.append(_line(("worker ", "dim"), format_bytes(d["worker_memory"])))
        else:
            if gpu.get("reason"):  # why there is no GPU: whole, on as many lines as it takes
                out.extend(_line((part, "dim")) for part in textwrap.wrap(gpu["reason"], max(10, width), break_on_hyphens=False))
            rss = resources.get("worker_rss")
            out.append(_line(("worker RSS ", "bold"), format_bytes(rss) if rss else "-"))
            memory = resources.get("memory") or {}
            if memory.get("total"):
                used = memory["total"] - memory.get("available", 0)
                out.append(_line(bar_line("machine ", used / memory["total"], used_of(used, memory["total"]), width)))
        out.extend(node_line(row) for row in nodes or [])
        return out or [Text("no devices reported", "dim")]
