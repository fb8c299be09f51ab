"""Small server-side SVG line charts (no JavaScript, no inline styles: CSP-friendly).

Values are numbers; labels are escaped by Jinja when the SVG is embedded with `|safe` only after
this module built it from numbers and escaped text.
"""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD = 360, 120, 24
PALETTE = ("#c0392b", "#e67e22", "#f1c40f", "#27ae60", "#2980b9", "#8e44ad", "#7f8c8d")


def line_chart(title: str, series: dict[str, list[float | None]], labels: list[str]) -> str:
    """An SVG with one polyline per series over the same x positions (None: a gap)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    top = max(values) if values else 1.0
    top = top if top > 0 else 1.0
    n = max((len(vs) for vs in series.values()), default=0)
    step = (WIDTH - 2 * PAD) / max(1, n - 1)

    def xy(i: int, v: float) -> str:
        x = PAD + i * step
        y = HEIGHT - PAD - (v / top) * (HEIGHT - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT + 18 * ((len(series) + 2) // 3)}"'
        f' role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text x="{PAD}" y="14" class="plot-title">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"'
        ' stroke="#999" stroke-width="1"/>',
        f'<text x="2" y="{PAD + 4}" class="plot-axis">{top:g}</text>',
    ]
    if labels:
        parts.append(
            f'<text x="{PAD}" y="{HEIGHT - 6}" class="plot-axis">{escape(labels[0])}</text>'
        )
        parts.append(
            f'<text x="{WIDTH - PAD}" y="{HEIGHT - 6}" class="plot-axis"'
            f' text-anchor="end">{escape(labels[-1])}</text>'
        )
    for si, (name, vs) in enumerate(series.items()):
        colour = PALETTE[si % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for i, v in enumerate(vs):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(xy(i, float(v)))
        for run in runs:
            if len(run) == 1:
                x, y = run[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>')
            elif run:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2"'
                    f' points="{" ".join(run)}"/>'
                )
        lx = PAD + (si % 3) * 110
        ly = HEIGHT + 10 + 18 * (si // 3)
        last = next((v for v in reversed(vs) if v is not None), None)
        parts.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(
            f'<text x="{lx + 14}" y="{ly}" class="plot-legend">{escape(name)}'
            f"{'' if last is None else f' ({last:g})'}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
