"""Synthetic curve stimuli in the style of Distill's "Curve Detectors" (Cammarata et al. 2020).

Every stimulus is a stroke drawn around an anchor pixel P: an arc of a circle, a straight line, a
corner (two straight arms meeting at P), or nothing (blank). The renderer is pure torch, analytic
and vectorised: for every pixel it computes the exact Euclidean distance to the stroke's centre
line and turns it into a coverage in [0, 1] with a one-pixel linear ramp (the box-filter coverage
of a straight edge), so edges are anti-aliased and the output is deterministic.

**Orientation convention.** As in Distill's radial tuning curves, orientation runs over the full
0–360°, so a curve and its mirror image are different stimuli. Angles are in degrees, measured counter-clockwise from the +x axis (pointing right) with y pointing UP in the
displayed image (rows grow downwards, so row offset = -sin). A curve of orientation θ is the arc
whose midpoint sits at P and whose outward normal at that midpoint points along θ: the circle's
centre lies at P - R·(cos θ, sin θ), so the arc bulges towards θ and its concave side (the "inside"
of the curve) faces θ + 180°. Orientation is therefore defined on the full circle 0–360°: the
curves at θ and θ + 180° are mirror images, and a curve detector has a single preferred θ. The
tangent at P runs along θ ± 90°. A straight line of orientation θ is the limit R → ∞ (it is the
same line as θ + 180°); a corner of orientation θ has its vertex at P pointing towards θ and its two
arms running back along θ + 180° ± (interior angle / 2), i.e. the curve with its arc replaced by
an angle. A shifted line is the line of orientation θ moved by `shift` pixels along the normal
(positive = towards the bulge side).

"Centred on a pixel" means the arc's midpoint (its apex) sits on the anchor, which keeps nearly
straight arcs (huge R) inside the receptive field; the circle's centre lies R away.

Rendering a parameter table is separate from building it (`StimulusTable`), so callers can render
and forward a large sweep chunk by chunk without holding every image in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("curve", "line", "corner", "blank")


@dataclass
class StimulusTable:
    """One row per stimulus; every column is a numpy array of length N (colours are [N, 3])."""

    kind: np.ndarray  # curve | line | corner | blank
    orientation: np.ndarray  # degrees, see the module docstring
    radius: np.ndarray  # px; inf for lines, corners and blanks
    length_px: np.ndarray  # stroke length along its centre line (corner: both arms together)
    width: np.ndarray  # stroke width, px
    fg: np.ndarray  # [N, 3] stroke colour RGB in [0, 1]
    bg: np.ndarray  # [N, 3] background colour RGB in [0, 1]
    cx: np.ndarray  # anchor column in pixel-index coordinates (pixel j has its centre at x = j)
    cy: np.ndarray  # anchor row in pixel-index coordinates
    jitter_x: np.ndarray  # px added to the anchor (to the right), already included in cx
    jitter_y: np.ndarray  # px added to the anchor (upwards), already included in cy
    shift: np.ndarray  # lines: offset along the normal, px (0 = through the anchor)
    corner_deg: np.ndarray  # corners: interior angle between the arms; nan otherwise
    condition: np.ndarray  # free label of the sweep a row belongs to (e.g. "base", "white_on_black")
    size: int = 224  # canvas side in pixels

    def __len__(self) -> int:
        return len(self.kind)

    def select(self, mask_or_idx) -> StimulusTable:
        """The rows picked by a boolean mask or an index array."""
        cols = {k: getattr(self, k)[mask_or_idx] for k in _COLUMNS}
        return StimulusTable(**cols, size=self.size)

    def rows(self) -> list[dict]:
        """The table as JSON-able dicts (one per stimulus)."""
        out = []
        for i in range(len(self)):
            row = {k: _jsonable(getattr(self, k)[i]) for k in _COLUMNS}
            out.append(row)
        return out


_COLUMNS = ("kind", "orientation", "radius", "length_px", "width", "fg", "bg", "cx", "cy",
            "jitter_x", "jitter_y", "shift", "corner_deg", "condition")


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.str_):
        return str(v)
    return v


def concat_tables(tables: Sequence[StimulusTable]) -> StimulusTable:
    """Stack tables that share a canvas size."""
    sizes = {t.size for t in tables}
    if len(sizes) != 1:
        raise ValueError(f"cannot concatenate tables with different canvas sizes {sorted(sizes)}")
    cols = {k: np.concatenate([getattr(t, k) for t in tables]) for k in _COLUMNS}
    return StimulusTable(**cols, size=tables[0].size)


def arc_length_px(radius, arc_length_deg: float, max_arc_px: float | None):
    """Pixel length of an arc spanning `arc_length_deg` of its circle, capped at `max_arc_px`.

    The cap keeps nearly straight arcs (huge radius) inside the receptive field; tight arcs keep
    their angular extent (a 120° arc of radius 4 is 8.4 px long).
    """
    r = np.asarray(radius, dtype=np.float64)
    length = np.where(np.isfinite(r), r * math.radians(arc_length_deg), np.inf)
    if max_arc_px is not None:
        length = np.minimum(length, float(max_arc_px))
    return length


def make_table(
    kind,
    orientation,
    *,
    size: int,
    centre: tuple[float, float],
    radius=np.inf,
    length_px=32.0,
    width=2.5,
    fg=(0.0, 0.0, 0.0),
    bg=(1.0, 1.0, 1.0),
    jitter=(0.0, 0.0),
    shift=0.0,
    corner_deg=np.nan,
    condition="base",
) -> StimulusTable:
    """Build a table by broadcasting every argument against `orientation` (N rows).

    `centre` is (row, col) of the anchor in pixel-index coordinates; `jitter` is (dx right, dy up)
    in px, either one pair or an [N, 2] array.
    """
    theta = np.atleast_1d(np.asarray(orientation, dtype=np.float64))
    n = theta.shape[0]

    def col(v, dtype=np.float64):
        return np.broadcast_to(np.asarray(v, dtype=dtype), (n,)).copy()

    def rgb(v):
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (n, 3)).copy()

    jit = np.broadcast_to(np.asarray(jitter, dtype=np.float64), (n, 2))
    kinds = np.broadcast_to(np.asarray(kind, dtype=object), (n,)).astype(str)
    bad = set(kinds.tolist()) - set(KINDS)
    if bad:
        raise ValueError(f"kind={sorted(bad)} is not valid; choose from {list(KINDS)}")
    radius_N = col(radius)
    radius_N[kinds != "curve"] = np.inf
    return StimulusTable(
        kind=kinds,
        orientation=np.mod(theta, 360.0),
        radius=radius_N,
        length_px=col(length_px),
        width=col(width),
        fg=rgb(fg),
        bg=rgb(bg),
        cx=col(centre[1]) + jit[:, 0],
        cy=col(centre[0]) - jit[:, 1],
        jitter_x=jit[:, 0].copy(),
        jitter_y=jit[:, 1].copy(),
        shift=col(shift),
        corner_deg=col(corner_deg),
        condition=np.broadcast_to(np.asarray(condition, dtype=object), (n,)).astype(str),
        size=int(size),
    )


def orientations(step_deg: float) -> np.ndarray:
    """Orientations 0 <= θ < 360 in steps of `step_deg` degrees."""
    if step_deg <= 0:
        raise ValueError(f"orientation step {step_deg} must be > 0")
    return np.arange(0.0, 360.0 - 1e-9, step_deg)


def curve_sweep(
    thetas,
    radii,
    *,
    size: int,
    centre: tuple[float, float],
    arc_length_deg: float = 120.0,
    max_arc_px: float | None = 40.0,
    width: float = 2.5,
    fg=(0.0, 0.0, 0.0),
    bg=(1.0, 1.0, 1.0),
    jitter=(0.0, 0.0),
    condition: str = "base",
) -> StimulusTable:
    """Arcs over orientation x radius, radius-major (row = i_radius * n_theta + i_theta).

    A radius of inf (or one so large that the arc is capped by `max_arc_px`) is a straight line
    of the same length; inf gives an exact straight "line" row.
    """
    thetas = np.asarray(thetas, dtype=np.float64)
    tables = []
    for r in radii:
        r = float(r)
        kind = "curve" if math.isfinite(r) else "line"
        length = float(arc_length_px(r, arc_length_deg, max_arc_px)) if math.isfinite(r) else (
            float(max_arc_px) if max_arc_px is not None else 40.0)
        tables.append(make_table(kind, thetas, size=size, centre=centre, radius=r,
                                 length_px=length, width=width, fg=fg, bg=bg, jitter=jitter,
                                 condition=condition))
    return concat_tables(tables)


def corner_sweep(thetas, corner_degs, *, size: int, centre, length_px: float, width: float = 2.5,
                 fg=(0.0, 0.0, 0.0), bg=(1.0, 1.0, 1.0), condition: str = "corner") -> StimulusTable:
    """Corners (angles) of every interior angle at every orientation, angle-major."""
    return concat_tables([
        make_table("corner", thetas, size=size, centre=centre, length_px=length_px, width=width,
                   fg=fg, bg=bg, corner_deg=float(a), condition=condition)
        for a in corner_degs
    ])


def shifted_line_sweep(thetas, shifts, *, size: int, centre, length_px: float, width: float = 2.5,
                       fg=(0.0, 0.0, 0.0), bg=(1.0, 1.0, 1.0),
                       condition: str = "shifted_line") -> StimulusTable:
    """Straight lines of every orientation moved `shift` px along their normal, shift-major."""
    return concat_tables([
        make_table("line", thetas, size=size, centre=centre, length_px=length_px, width=width,
                   fg=fg, bg=bg, shift=float(s), condition=condition)
        for s in shifts
    ])


def blank_table(*, size: int, centre, bg=(1.0, 1.0, 1.0), condition: str = "blank") -> StimulusTable:
    """A single blank canvas of colour `bg`."""
    return make_table("blank", [0.0], size=size, centre=centre, bg=bg, condition=condition)


# --------------------------------------------------------------------------------------------
# Rendering


def _unit(deg_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rad = torch.deg2rad(deg_N)
    return torch.cos(rad), torch.sin(rad)


def _seg_dist(px, py, ax, ay, bx, by):
    """Distance from points (px, py) [N, H, W] to segments a-b given as [N, 1, 1]."""
    vx, vy = bx - ax, by - ay
    len2 = (vx * vx + vy * vy).clamp_min(1e-12)
    t = (((px - ax) * vx + (py - ay) * vy) / len2).clamp(0.0, 1.0)
    dx, dy = px - (ax + t * vx), py - (ay + t * vy)
    return torch.sqrt(dx * dx + dy * dy)


def _stroke_distance(t: StimulusTable, dtype=torch.float32) -> torch.Tensor:
    """Distance [N, H, W] from every pixel centre to the stroke's centre line (inf for blanks).

    float32 is exact enough: coordinates are taken relative to the anchor, so even a radius-1000
    arc is placed to ~1e-4 px. Each kind is computed on its own rows only.
    """
    n, s = len(t), t.size
    dist = torch.full((n, s, s), math.inf, dtype=dtype)
    cols = torch.arange(s, dtype=dtype).view(1, 1, s)
    rows = torch.arange(s, dtype=dtype).view(1, s, 1)
    for kind in ("curve", "line", "corner"):
        idx = np.where(t.kind == kind)[0]
        if len(idx) == 0:
            continue
        sub = t.select(idx)
        m = len(idx)

        def f(a, m=m):
            return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype).view(m, 1, 1)

        # Maths frame centred on the anchor: x right, y up.
        px = cols - f(sub.cx)
        py = f(sub.cy) - rows
        ux, uy = _unit(f(sub.orientation))  # outward normal at the anchor
        half = f(sub.length_px) / 2
        if kind == "curve":
            r = f(sub.radius)
            alpha = (half / r).clamp(max=math.pi)  # half of the angular span
            vx, vy = px + r * ux, py + r * uy  # relative to the circle's centre
            rho = torch.sqrt(vx * vx + vy * vy)
            # Signed angle between the pixel's direction and the arc's mid direction.
            dphi = torch.atan2(ux * vy - uy * vx, ux * vx + uy * vy)
            ends = []
            for sgn in (1.0, -1.0):
                ca, sa = torch.cos(alpha), sgn * torch.sin(alpha)
                ex = r * (ux * ca - uy * sa) - r * ux  # endpoint, relative to the anchor
                ey = r * (uy * ca + ux * sa) - r * uy
                ends.append(torch.sqrt((px - ex) ** 2 + (py - ey) ** 2))
            d = torch.where(dphi.abs() <= alpha, (rho - r).abs(), torch.minimum(*ends))
        elif kind == "line":
            tx, ty = -uy, ux  # tangent at the anchor
            sh = f(sub.shift)
            mx, my = sh * ux, sh * uy
            d = _seg_dist(px, py, mx - half * tx, my - half * ty, mx + half * tx, my + half * ty)
        else:
            beta = f(np.where(np.isfinite(sub.corner_deg), sub.corner_deg, 90.0)) / 2
            d = None
            for sgn in (1.0, -1.0):
                ax, ay = _unit(f(sub.orientation) + 180.0 + sgn * beta)
                zero = torch.zeros_like(ax)
                di = _seg_dist(px, py, zero, zero, half * ax, half * ay)
                d = di if d is None else torch.minimum(d, di)
        dist[torch.as_tensor(idx)] = d.expand(m, s, s)
    return dist


def render(t: StimulusTable, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the table as RGB images [n, 3, size, size] in [0, 1] (float32)."""
    sub = t.select(slice(start, stop if stop is not None else len(t)))
    if len(sub) == 0:
        return torch.zeros(0, 3, t.size, t.size)
    dist_NHW = _stroke_distance(sub)
    half_w = torch.as_tensor(sub.width, dtype=dist_NHW.dtype).view(-1, 1, 1) / 2
    # Coverage of a 1-px box filter by a straight edge at signed distance (half_w - d).
    cov = (half_w + 0.5 - dist_NHW).clamp(0.0, 1.0).float().unsqueeze(1)
    fg = torch.as_tensor(sub.fg, dtype=torch.float32).view(-1, 3, 1, 1)
    bg = torch.as_tensor(sub.bg, dtype=torch.float32).view(-1, 3, 1, 1)
    return (bg + (fg - bg) * cov).clamp(0.0, 1.0)


def iter_chunks(t: StimulusTable, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, images) for consecutive chunks of at most `chunk` stimuli."""
    for start in range(0, len(t), chunk):
        yield start, render(t, start, min(start + chunk, len(t)))


@dataclass(frozen=True)
class Stimuli:
    """Rendered images [N, 3, H, W] with their parameter table."""

    images: torch.Tensor
    table: StimulusTable = field(repr=False)


def render_all(t: StimulusTable) -> Stimuli:
    """Render a whole (small) table at once."""
    return Stimuli(render(t), t)
