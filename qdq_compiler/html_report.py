"""A self-contained HTML report of a compile: what a user looks at to trust the INT8 model.

Per-site histograms of |x| with every calibration method's amax marked, the sensitivity
ranking, the distribution of FP32-vs-INT8 cosine over evaluation samples, and the settings.
Plots are matplotlib PNGs inlined as base64, so the file stands alone.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .calibration import HistogramCollector, amaxes
from .errors import QdqcError

COLORS = {"max": "#444444", "percentile": "#1f77b4", "mse": "#2ca02c", "entropy": "#d62728", "chosen": "#ff7f0e"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QdqcError("the HTML report needs matplotlib: pip install matplotlib (or the `report` extra)") from None
    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(figure)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def histogram_figure(name: str, collector: HistogramCollector, chosen: float, percentile: float):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.2, 2.4))
    edges = collector.edges
    axes.bar(edges[:-1], np.maximum(collector.counts, 0.8), width=collector.width, align="edge", color="#bbbbbb",
             log=True)
    for method, value in amaxes(collector, percentile=percentile).items():
        axes.axvline(value, color=COLORS[method], lw=1, label=f"{method} {value:.3g}")
    axes.axvline(chosen, color=COLORS["chosen"], lw=2, ls="--", label=f"chosen {chosen:.3g}")
    axes.set_title(name[-60:], fontsize=7)
    axes.tick_params(labelsize=6)
    axes.legend(fontsize=5, loc="upper right")
    return figure


def cosine_figure(cosines: np.ndarray):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 2.6))
    values = np.asarray(cosines, np.float64)
    spread = float(values.max() - values.min()) if values.size else 0.0
    # a model this close to FP32 spans a few float32 ulps: fewer bins than distinct values fails
    axes.hist(values, bins=50 if spread > 1e-6 else 1, color="#1f77b4")
    axes.set_xlabel("cosine of mean-pooled embeddings, INT8 vs FP32")
    axes.set_ylabel("samples")
    return figure


def write_report(path: str | Path, *, title: str, settings: dict, collectors: dict[str, HistogramCollector],
                 chosen: dict[str, float], percentile: float, ranking: list | None = None,
                 cosines: np.ndarray | None = None) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.grid img{margin:4px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Settings</h2><table>"]
    parts += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()]
    parts.append("</table>")
    if cosines is not None and len(cosines):
        parts.append(f"<h2>Fidelity on {len(cosines)} evaluation samples</h2>"
                     f"<p>mean {cosines.mean():.5f}, min {cosines.min():.5f}, 1st percentile "
                     f"{np.percentile(cosines, 1):.5f}</p>" + _png(cosine_figure(cosines)))
    if ranking:
        parts.append("<h2>Sensitivity (worst first)</h2><table><tr><th>rank</th><th>tensor</th>"
                     "<th>only this site: cosine</th><th>SNR dB</th><th>all but this: cosine</th><th>SNR dB</th></tr>")
        parts += [f"<tr><td>{i}</td><td>{html.escape(s.tensor)}</td><td>{s.only_cosine:.6f}</td>"
                  f"<td>{s.only_snr_db:.1f}</td><td>{s.without_cosine:.6f}</td><td>{s.without_snr_db:.1f}</td></tr>"
                  for i, s in enumerate(ranking, 1)]
        parts.append("</table>")
    parts.append(f"<h2>Activation histograms ({len(collectors)} sites)</h2><p>|x| counts (log scale), each "
                 "calibration method's amax, and the one used.</p><div class='grid'>")
    parts += [_png(histogram_figure(name, collector, chosen.get(name, collector.amax), percentile))
              for name, collector in collectors.items() if collector.width]
    parts.append("</div></body></html>")
    from . import ir

    ir.write_text_atomic(path, "\n".join(parts))
    return Path(path)
