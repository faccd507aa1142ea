"""Plain-text tables for the reports the applications and the command line print."""
from __future__ import annotations


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table from a list of dicts."""
    if not rows:
        return ""
    cols = columns or list(rows[0])
    cells = [[str(c) for c in cols]] + [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e5) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)
