"""Server-side SVG charts: the geometry of small line and bar charts, drawn by templates.

Charts are computed here and written into the page as SVG, so the dashboard needs no chart
library, no inline script, and a chart is correct with JavaScript off. Everything is plain
arithmetic on lists of floats: one x value (a round number) per point, any number of series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

WIDTH = 560
HEIGHT = 220
#: Plot area inside the SVG (left, top, right, bottom margins): room for tick labels.
MARGIN = (52, 24, 12, 30)


@dataclass(frozen=True)
class Series:
    """One line (or set of bars): ``points`` are (x, y); a ``None`` y leaves a gap."""

    name: str
    points: Sequence[tuple[float, float | None]]
    #: CSS class of the line: s1..s4 pick the palette's colours; ``ref`` a dashed reference.
    css: str = "s1"


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class DrawnSeries:
    name: str
    css: str
    #: SVG polyline ``points`` attributes, one per unbroken run of points.
    paths: list[str]
    #: Every drawn point: (x pixel, y pixel, x value, y value).
    markers: list[tuple[float, float, float, float]]
    #: Bars: (x, y, width, height) in pixels.
    bars: list[tuple[float, float, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Chart:
    title: str
    y_label: str
    width: int
    height: int
    plot: tuple[float, float, float, float]  # left, top, right, bottom (pixels)
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    series: list[DrawnSeries]
    empty: bool
    x_label: str = "round"
    #: Whether y is drawn on a log10 scale (ticks at 1-2-5 x 10^k).
    log_y: bool = False


def nice_step(span: float, target_ticks: int = 4) -> float:
    """The 1-2-5 x 10^k step that divides ``span`` into about ``target_ticks`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    base = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * base:
            return float(m * base)
    return float(10 * base)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis spanning ``[lo, hi]`` (both > 0): the powers of ten inside,
    with 2 and 5 x 10^k added while the span is under two decades."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if k1 - k0 <= 2 else (1,)
    return [m * 10.0**k for k in range(k0, k1 + 1) for m in mults if lo <= m * 10.0**k <= hi]


def _y_range(values: list[float], zero: bool) -> tuple[float, float, float]:
    lo, hi = min(values), max(values)
    if zero:
        lo = min(lo, 0.0)
        hi = max(hi, 0.0)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        if zero and lo < 0 <= min(values):
            lo = 0.0
    step = nice_step(hi - lo)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def chart(
    title: str,
    series: Sequence[Series],
    *,
    y_label: str = "",
    bars: bool = False,
    zero: bool = True,
    width: int = WIDTH,
    height: int = HEIGHT,
    x_label: str = "round",
    integer_x: bool = True,
    log_y: bool = False,
) -> Chart:
    """Lay out ``series`` on shared axes: x from the smallest to the largest x of any point,
    y over every finite value (from 0 when ``zero``), each rounded out to a 1-2-5 tick step.
    Points are mapped linearly: ``px = left + (x - x0) / (x1 - x0) * (right - left)`` and
    ``py = bottom - (y - y0) / (y1 - y0) * (bottom - top)``; with ``log_y`` the same map is
    applied to ``log10(y)`` (only positive values are drawn; ``zero`` is ignored), so lines an
    order of magnitude apart stay readable. ``integer_x``: x ticks at whole numbers (rounds).
    """
    left, top = MARGIN[0], MARGIN[1]
    right, bottom = width - MARGIN[2], height - MARGIN[3]

    def shown(y: float | None) -> bool:
        return y is not None and math.isfinite(y) and (y > 0 or not log_y)

    def ty(y: float) -> float:
        return math.log10(y) if log_y else y

    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if y is not None and shown(y)]
    if not xs or not ys:
        return Chart(
            title, y_label, width, height, (left, top, right, bottom), [], [], [], True,
            x_label, log_y,
        )  # fmt: skip
    x0, x1 = min(xs), max(xs)
    if bars:  # room for half a bar on either side
        x0, x1 = x0 - 0.5, x1 + 0.5
    elif x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if log_y:
        lo, hi = min(ys), max(ys)
        if hi == lo:
            lo, hi = lo / 2, hi * 2
        y_values = _log_ticks(lo, hi)
        # The axis spans whole ticks around the data: down to the 1-2-5 value below the
        # smallest point, up to the one above the largest.
        below = [v for v in _log_ticks(lo / 10, lo) if v <= lo]
        above = [v for v in _log_ticks(hi, hi * 10) if v >= hi]
        lo, hi = (below[-1] if below else lo), (above[0] if above else hi)
        y_values = sorted({lo, *y_values, hi})
        y0, y1 = math.log10(lo), math.log10(hi)
    else:
        y0, y1, ystep = _y_range(ys, zero)
        y_values = [y0 + i * ystep for i in range(round((y1 - y0) / ystep) + 1)]

    def px(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (right - left), 2)

    def py(y: float) -> float:
        return round(bottom - (ty(y) - y0) / (y1 - y0) * (bottom - top), 2)

    xstep = nice_step(x1 - x0, 6)
    if integer_x:
        xstep = max(1.0, xstep)
    first = math.ceil(x0 / xstep) * xstep
    x_ticks = [
        Tick(px(first + i * xstep), _fmt(first + i * xstep))
        for i in range(int((x1 - first) / xstep + 1e-9) + 1)
        if first + i * xstep <= x1 + 1e-9 * xstep
    ]
    y_ticks = [Tick(py(y), _fmt(y)) for y in y_values]

    drawn = []
    n = max(len(series), 1)
    slot = (right - left) / max(x1 - x0, 1.0)  # pixels per unit of x
    bar_w = max(1.0, slot * 0.8 / n)
    for k, s in enumerate(series):
        paths: list[str] = []
        run: list[str] = []
        markers = []
        rects = []
        for x, y in sorted(s.points, key=lambda p: p[0]):
            if y is None or not shown(y):
                if run:
                    paths.append(" ".join(run))
                    run = []
                continue
            run.append(f"{px(x)},{py(y)}")
            markers.append((px(x), py(y), x, y))
            if bars:
                bx = px(x) - slot * 0.4 + k * bar_w
                base = py(10.0**y0 if log_y else max(y0, 0.0))
                rects.append(
                    (round(bx, 2), min(py(y), base), round(bar_w, 2), round(abs(base - py(y)), 2))
                )
        if run:
            paths.append(" ".join(run))
        drawn.append(DrawnSeries(s.name, s.css, [] if bars else paths, markers, rects))
    return Chart(
        title, y_label, width, height, (left, top, right, bottom), x_ticks, y_ticks, drawn,
        False, x_label, log_y,
    )  # fmt: skip
