"""Plain-text tables for the reports' ``__str__`` (summaries, shrink and save reports)."""

from __future__ import annotations

from collections.abc import Sequence


def table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    footer: Sequence[str] | None = None,
    *,
    left: int = 1,
) -> str:
    """Columns padded to their widest cell: the first ``left`` aligned left, the rest right.

    A rule of dashes goes under the header and, with a ``footer`` row, above it.

    >>> print(table(("layer", "kept"), [("fc1", "8%"), ("fc2", "9%")], ("total", "8.5%")))
    layer  kept
    -----------
    fc1      8%
    fc2      9%
    -----------
    total  8.5%
    """
    rows = [tuple(header), *map(tuple, body), *([tuple(footer)] if footer is not None else [])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = (
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(rows[0]))
    lines = [fmt(rows[0]), rule, *map(fmt, rows[1 : len(body) + 1])]
    if footer is not None:
        lines += [rule, fmt(rows[-1])]
    return "\n".join(lines)
