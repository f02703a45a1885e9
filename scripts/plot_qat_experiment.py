"""Plots of a QAT experiment (scripts/qat_experiment.py --out DIR), as dependency-free SVG.

    python scripts/plot_qat_experiment.py DIR [--out DIR]

Writes loss_curves.svg (training cross-entropy of the float, QAT and QAD fine-tunes, every seed,
from DIR/seedN/{float_ft,qat,qad}/metrics.jsonl), perplexity.svg (word perplexity of every
evaluation per seed) and recovery.svg (the recovery of each seed's QAT and QAD and of each
ablation), from DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from xml.sax.saxutils import escape

COLORS = {
    "float_ft": "#1f77b4",
    "qat": "#d62728",
    "base": "#7f7f7f",
    "base_ptq": "#c7c7c7",
    "float_ft_ptq": "#aec7e8",
    "nvfp4": "#ff9896",
    "qad": "#2ca02c",
    "qad_nvfp4": "#98df8a",
}
W, H, PAD, BOTTOM = 800, 460, 60, 130  # BOTTOM: room under the plot for labels


def _svg(body: list[str], title: str) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">'
        f'<rect width="{W}" height="{H}" fill="white"/>'
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>'
    )
    return head + "".join(body) + "</svg>\n"


def _axes(lo: float, hi: float, label: str) -> list[str]:
    """Left axis from lo to hi with five ticks, and the plot frame."""
    out = [
        f'<rect x="{PAD}" y="{PAD}" width="{W - 2 * PAD}" height="{H - PAD - BOTTOM}" fill="none" stroke="black"/>',
        f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">{escape(label)}</text>',
    ]
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = H - BOTTOM - (H - PAD - BOTTOM) * i / 4
        out.append(f'<text x="{PAD - 5}" y="{y + 4}" text-anchor="end">{v:.3g}</text>')
    return out


def _y(v: float, lo: float, hi: float) -> float:
    return H - BOTTOM - (H - PAD - BOTTOM) * (v - lo) / (hi - lo)


def loss_curves(curves: dict[str, list[tuple[int, float]]]) -> str:
    """curves: {label ('seed0 qat'): [(step, loss)]} -> line plot."""
    points = [p for c in curves.values() for p in c]
    x_hi = max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    body = _axes(lo, hi, "training loss")
    body.append(f'<text x="{W / 2}" y="{H - BOTTOM + 20}" text-anchor="middle">fine-tune step (0 .. {x_hi})</text>')
    for i, (label, c) in enumerate(curves.items()):
        color = COLORS[label.split()[-1]]
        dash = ' stroke-dasharray="6 3"' if i % 4 >= 2 else ""
        pts = " ".join(f"{PAD + (W - 2 * PAD) * s / x_hi:.1f},{_y(v, lo, hi):.1f}" for s, v in c)
        body.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        body.append(
            f'<line x1="{W - PAD - 150}" x2="{W - PAD - 120}" y1="{PAD + 15 + 15 * i}" '
            f'y2="{PAD + 15 + 15 * i}" stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{W - PAD - 115}" y="{PAD + 19 + 15 * i}">{escape(label)}</text>'
        )
    return _svg(body, "Fine-tune cross-entropy: float, NVFP4 QAT and QAD (same data, steps, schedule)")


def bars(groups: dict[str, dict[str, float]], title: str, label: str, ref: float | None = None) -> str:
    """groups: {group: {series: value}} -> grouped bar chart. Without ``ref`` the axis starts
    just under the minimum (perplexities); with it, at 0, with a dashed line at ``ref``."""
    values = [v for g in groups.values() for v in g.values()]
    lo = min(0.0, min(values)) if ref is not None else min(values) * 0.98
    hi = max(values + ([ref] if ref is not None else [])) * 1.05
    body = _axes(lo, hi, label)
    if ref is not None:
        body.append(
            f'<line x1="{PAD}" x2="{W - PAD}" y1="{_y(ref, lo, hi):.1f}" y2="{_y(ref, lo, hi):.1f}" '
            f'stroke="black" stroke-dasharray="4 4"/>'
        )
    group_w = (W - 2 * PAD) / len(groups)
    for gi, (group, series) in enumerate(groups.items()):
        bar_w = group_w * 0.8 / len(series)
        for si, (name, v) in enumerate(series.items()):
            x = PAD + gi * group_w + group_w * 0.1 + si * bar_w
            y0, y1 = _y(0.0 if lo < 0 else lo, lo, hi), _y(v, lo, hi)
            body.append(
                f'<rect x="{x:.1f}" y="{min(y0, y1):.1f}" width="{bar_w * 0.9:.1f}" height="{abs(y0 - y1):.1f}" '
                f'fill="{COLORS.get(name, "#9467bd")}"><title>{escape(f"{group} {name}: {v:.4g}")}</title></rect>'
            )
            if len(series) > 1 and gi == 0:
                body.append(
                    f'<rect x="{PAD + 10 + 110 * si}" y="{H - 28}" width="10" height="10" fill="{COLORS.get(name)}"/>'
                    f'<text x="{PAD + 24 + 110 * si}" y="{H - 19}">{escape(name)}</text>'
                )
        x = PAD + gi * group_w + group_w / 2
        body.append(
            f'<text x="{x:.1f}" y="{H - BOTTOM + 14}" transform="rotate(30 {x:.1f} {H - BOTTOM + 14})">'
            f"{escape(group)}</text>"
        )
    return _svg(body, title)


def _curve(path: Path) -> list[tuple[int, float]]:
    """(step, cross-entropy on the labels): a QAD run's loss is its KL, so its ``distill/ce``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r.get("distill/ce", r["loss"])) for r in rows if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, help="folder for the SVGs (default: DIR)")
    a = p.parse_args()
    out = a.out or a.dir
    results = json.loads((a.dir / "results.json").read_text())
    curves = {
        f"seed{s} {run}": _curve(a.dir / f"seed{s}" / run / "metrics.jsonl")
        for s in results["seeds"]
        for run in ("float_ft", "qat", "qad")
        if (a.dir / f"seed{s}" / run / "metrics.jsonl").is_file()
    }
    if curves:
        (out / "loss_curves.svg").write_text(loss_curves(curves))
    rows = ("base", "base_ptq", "float_ft", "float_ft_ptq", "qat", "nvfp4", "qad", "qad_nvfp4")
    ppl = {f"seed {s}": {k: r[k] for k in rows if k in r} for s, r in results["seeds"].items()}
    (out / "perplexity.svg").write_text(
        bars(ppl, "Word perplexity on held-out text (lower is better)", "word perplexity")
    )
    rec = {
        name: {k: r[key] * 100 for k, key in (("qat", "recovery"), ("qad", "qad_recovery")) if key in r}
        for name, r in [*((f"seed {s}", r) for s, r in results["seeds"].items()), *results.get("ablations", {}).items()]
    }
    (out / "recovery.svg").write_text(
        bars(
            rec,
            "Share of the PTQ gap recovered, % (QAT: vs its float fine-tune; QAD: vs its teacher; dashed: 80%)",
            "recovery %",
            ref=80.0,
        )
    )
    print(f"wrote {', '.join(sorted(f.name for f in out.glob('*.svg')))} to {out}")


if __name__ == "__main__":
    main()
