"""Loss curves from metrics.jsonl to a PNG, with numpy + zlib only (no matplotlib dependency).

Two panels: the total loss (train line, validation line with dots) and its text / audio parts. Axes carry
"nice" ticks labelled with a built-in 5x7 pixel font; the PNG is written by hand (RGB, one IDAT chunk).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .jsonl import read_metrics, series

_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "/": "00001 00010 00010 00100 01000 01000 10000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "+": "00000 00100 00100 11111 00100 00100 00000", "=": "00000 00000 11111 00000 11111 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111", " ": "00000 00000 00000 00000 00000 00000 00000",
}
FONT = {c: np.array([[b == "1" for b in row] for row in rows.split()], dtype=bool) for c, rows in _FONT_ROWS.items()}

WHITE, BLACK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
BLUE, ORANGE, GREEN, RED, PURPLE = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)


class Canvas:
    def __init__(self, width: int, height: int):
        self.img = np.full((height, width, 3), 255, dtype=np.uint8)

    @property
    def height(self) -> int:
        return self.img.shape[0]

    @property
    def width(self) -> int:
        return self.img.shape[1]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = sorted((max(0, int(x0)), min(self.width, int(x1))))
        y0, y1 = sorted((max(0, int(y0)), min(self.height, int(y1))))
        self.img[y0:y1, x0:x1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n)).astype(int)
        for dx in range(width):
            for dy in range(width):
                x, y = xs + dx - width // 2, ys + dy - width // 2
                ok = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
                self.img[y[ok], x[ok]] = color

    def dot(self, x: float, y: float, color, r: int = 3) -> None:
        self.rect(x - r, y - r, x + r + 1, y + r + 1, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2, anchor: str = "left") -> None:
        s = s.upper()
        w = len(s) * 6 * scale
        if anchor == "center":
            x -= w // 2
        elif anchor == "right":
            x -= w
        for i, ch in enumerate(s):
            g = FONT.get(ch, FONT[" "])
            big = np.kron(g, np.ones((scale, scale), dtype=bool))
            gx, gy = x + i * 6 * scale, y
            h, wd = big.shape
            if gx < 0 or gy < 0 or gx + wd > self.width or gy + h > self.height:
                continue
            region = self.img[gy:gy + h, gx:gx + wd]
            region[big] = color

    def save_png(self, path: str | Path) -> None:
        write_png(path, self.img)


def write_png(path: str | Path, img: np.ndarray) -> None:
    """8-bit RGB PNG: filter byte 0 per row, one zlib stream."""
    h, w, _ = img.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out, t = [], first
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


Series = tuple[str, Sequence[float], Sequence[float], tuple, bool]  # label, xs, ys, color, dots


def panel(c: Canvas, x0: int, y0: int, w: int, h: int, title: str, data: list[Series]) -> None:
    """Axes with ticks, grid and a legend in the box (x0, y0, w, h); each series a line (and dots)."""
    left, bottom, top = 70, 40, 50
    px0, px1, py0, py1 = x0 + left, x0 + w - 30, y0 + top, y0 + h - bottom
    c.text(x0 + w // 2, y0 + 8, title, anchor="center")
    xs_all = [x for _, xs, ys, _, _ in data for x, y in zip(xs, ys) if math.isfinite(y)]
    ys_all = [y for _, xs, ys, _, _ in data for y in ys if math.isfinite(y)]
    c.rect(px0, py1, px1, py1 + 2, BLACK)
    c.rect(px0 - 2, py0, px0, py1 + 2, BLACK)
    if not ys_all:
        c.text((px0 + px1) // 2, (py0 + py1) // 2, "no data", anchor="center")
        return
    xlo, xhi = min(xs_all), max(xs_all)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = min(ys_all), max(ys_all)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad

    def sx(x: float) -> float:
        return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)

    def sy(y: float) -> float:
        return py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)

    for t in nice_ticks(ylo, yhi):
        y = sy(t)
        c.rect(px0, y, px1, y + 1, GRID)
        c.text(px0 - 6, int(y) - 7, _fmt(t), anchor="right")
    for t in nice_ticks(xlo, xhi):
        x = sx(t)
        c.rect(x, py1, x + 1, py1 + 6, BLACK)
        c.text(int(x), py1 + 10, _fmt(t), anchor="center")
    c.text(px1, py1 + 28, "step", anchor="right", scale=1)
    lx = px0 + 8
    for label, xs, ys, color, dots in data:
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        for (a, b), (p, q) in zip(pts, pts[1:]):
            c.line(a, b, p, q, color)
        if dots or len(pts) == 1:
            for a, b in pts:
                c.dot(a, b, color)
        if pts:
            c.rect(lx, y0 + 30, lx + 14, y0 + 36, color)
            c.text(lx + 18, y0 + 28, label, scale=1)
            lx += 18 + 6 * len(label) + 16


def render_metrics_png(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Render train/val curves of a metrics.jsonl into a PNG; returns the PNG path."""
    recs = read_metrics(metrics_path)
    c = Canvas(1200, 460)
    tr = series(recs, "train", "loss")
    va = series(recs, "val", "loss")
    panel(c, 0, 0, 600, 460, "total loss", [("train", *tr, BLUE, False), ("val", *va, ORANGE, True)])
    parts = [("train text", *series(recs, "train", "text_loss"), BLUE, False),
             ("train audio", *series(recs, "train", "audio_loss"), GREEN, False),
             ("val text", *series(recs, "val", "text_loss"), PURPLE, True),
             ("val audio", *series(recs, "val", "audio_loss"), RED, True)]
    panel(c, 600, 0, 600, 460, "text / audio loss", parts)
    out_path = Path(out_path)
    c.save_png(out_path)
    return out_path
