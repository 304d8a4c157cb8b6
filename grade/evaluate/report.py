"""The self-contained evaluation report (report.html): tables and matplotlib figures inlined as PNG.

No external URL anywhere (no CDN scripts, fonts or images): the file opens offline, in a KFP UI
artifact viewer or attached to an e-mail.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import torch

FLAVOUR_TITLES = {"true": "true (simulator ground truth)",
                  "estimated": "estimated (counterfactual estimates from the logs under the estimated "
                               "examination)",
                  "prior": "prior (MTL predictions, a diagnostic)",
                  "replay": "replay (logged labels)"}
CURVE_HINTS = ("loss", "reward", "ndcg", "kl", "kappa", "entropy", "opm", "value")
MAX_POINTS_PER_SEGMENT = 3000


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    _mpl().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _colours(names: list[str]) -> dict[str, Any]:
    cmap = _mpl().get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _pct(lift: dict[str, float] | None) -> str:
    if not lift:
        return "n/a"
    cls = "pos" if lift["ci_low"] > 0 else "neg" if lift["ci_high"] < 0 else "zero"
    return (f'<span class="{cls}">{100 * lift["lift"]:+.2f}%</span> '
            f'<small>[{100 * lift["ci_low"]:+.2f}, {100 * lift["ci_high"]:+.2f}]</small>')


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def metrics_table(report: dict[str, Any]) -> str:
    policies = report["policies"]
    cols = [(f, m) for f in FLAVOUR_TITLES
            for m in dict.fromkeys(m for p in policies.values() for m in p.get(f, {}))]
    head1 = "".join(f'<th colspan="{sum(1 for c in cols if c[0] == f)}">{f}</th>'
                    for f in FLAVOUR_TITLES if any(c[0] == f for c in cols))
    head2 = "".join(f"<th>{html.escape(m)}</th>" for _, m in cols)
    rows = []
    for name, p in policies.items():
        cells = "".join(f"<td>{_fmt(p.get(f, {}).get(m))}</td>" for f, m in cols)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (f'<table class="metrics"><thead><tr><th rowspan="2">policy</th>{head1}</tr>'
            f"<tr>{head2}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def lifts_table(lifts: dict[str, Any], flavour: str, reference: str) -> str:
    metrics = ["ctr", "cvr", "opm", "gpm"]
    rows = [f"<tr><th>{html.escape(p)}</th>"
            + "".join(f"<td>{_pct(v.get(flavour, {}).get(m))}</td>" for m in metrics)
            + "</tr>" for p, v in lifts.items()]
    head = "".join(f"<th>{m.upper()}</th>" for m in metrics)
    return (f'<table class="lifts"><caption>{flavour} lifts vs {html.escape(reference)}, relative, '
            f"with paired bootstrap CIs</caption><thead><tr><th>policy</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def segments_table(report: dict[str, Any]) -> str:
    seg = report.get("segments", {})
    by = seg.get("by_segment", {})
    if not by:
        return "<p>No segment breakdown.</p>"
    flavour, metric = report["primary_flavour"], report["primary_metric"]
    name = metric.upper()
    pols = [p for p in report["lift_vs_static"] if p != "logged"]
    head = "".join(f"<th>{html.escape(p)} {name} lift</th>" for p in pols)
    rows = []
    for label, v in by.items():
        static_value = v["policies"].get("static", {}).get(flavour, {}).get(metric)
        cells = "".join(f"<td>{_pct(v['lift_vs_static'].get(p, {}).get(flavour, {}).get(metric))}</td>"
                        for p in pols)
        rows.append(f"<tr><th>{html.escape(str(label))}</th><td>{v['n_requests']}</td>"
                    f"<td>{_fmt(static_value, 3)}</td>{cells}</tr>")
    feature = html.escape(seg.get("feature", ""))
    return (f'<table class="lifts"><caption>{flavour} {name} by {feature}</caption>'
            f"<thead><tr><th>segment</th><th>requests</th><th>static {name}</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def estimator_check_tables(report: dict[str, Any]) -> str:
    """The estimator check: estimated vs true per policy, and each estimator's per-segment grid picks."""
    check = report.get("estimator_check") or {}
    if not check:
        return "<p>No ground truth: no estimator check.</p>"
    metric = check["metric"].upper()
    form = ((report.get("weight_level") or {}).get("estimator")
            if "weight_level_covered_share" in check else None)
    rows = []
    for name, r in check["policies"].items():
        covered = "" if "covered" not in r else ("yes" if r["covered"] else "<b>no</b>")
        lifts = "" if "true_lift" not in r else (
            f"<td>{100 * r['true_lift']:+.2f}%</td><td>{100 * r['estimated_lift']:+.2f}% "
            f"<small>[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]</small></td>")
        lifts = lifts or "<td></td><td></td>"
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{_fmt(r['true'])}</td><td>{_fmt(r['estimated'])}</td>"
                    f"{lifts}<td>{covered}</td>{_weight_cells(r.get(form)) if form else ''}</tr>")
    order = check["ordering"]
    share = check["covered_share"]
    share_text = "n/a" if share is None else f"{100 * share:.0f}%"
    out = [f'<table class="lifts"><caption>{metric}: true vs estimated ({html.escape(check["estimator"])}); '
           f"true lifts inside the estimated CI: {share_text}; ordering "
           f"agrees on {order['agreeing']}/{order['pairs']} pairs whose true values differ by more than "
           f"{100 * order['margin']:.0f}%</caption><thead><tr><th>policy</th><th>true</th><th>estimated</th>"
           f"<th>true lift</th><th>estimated lift [CI]</th><th>covered</th>{_weight_head(check, form)}"
           f"</tr></thead>"
           f"<tbody>{''.join(rows)}</tbody></table>"]
    segs = check.get("segments", {})
    if segs:
        names = [k for k in next(iter(segs.values())) if k != "best"]
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(f"<tr><th>{html.escape(seg)}</th><td>{row['best']['weights']}</td>"
                       + "".join(f"<td>{_fmt(row[n]['share'], 3)} <small>{row[n]['weights']}</small></td>"
                                 for n in names) + "</tr>" for seg, row in segs.items())
        out.append('<table class="lifts"><caption>Per true segment of the valid split: the true value of '
                   "the grid vector each estimator picks, as a share of the segment's truly best vector"
                   f"</caption><thead><tr><th>segment</th><th>best weights</th>{head}</tr></thead>"
                   f"<tbody>{body}</tbody></table>")
    return "".join(out)


def _weight_head(check: dict[str, Any], form: str | None) -> str:
    if not form:
        return ""
    share = check["weight_level_covered_share"].get(form)
    text = "n/a" if share is None else f"{100 * share:.0f}%"
    return f"<th>{html.escape(form)} lift [CI]</th><th>covered ({text})</th>"


def _weight_cells(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "<td></td><td></td>"
    if cell.get("unsupported"):
        return f"<td>{100 * cell['estimated_lift']:+.2f}%</td><td>unsupported</td>"
    return (f"<td>{100 * cell['estimated_lift']:+.2f}% <small>[{100 * cell['ci_low']:+.2f}, "
            f"{100 * cell['ci_high']:+.2f}]</small></td><td>{'yes' if cell['covered'] else '<b>no</b>'}</td>")


def l1_table(report: dict[str, Any]) -> str:
    """Each named model's mean learned weights per segment beside the segment's best, and their L1
    distance."""
    dist = report.get("segments", {}).get("l1_to_best", {})
    rows = []
    for model, segs in dist.items():
        for seg, r in segs.items():
            if seg != "mean_l1":
                rows.append(f"<tr><th>{html.escape(model)}</th><td>{html.escape(seg)}</td>"
                            f"<td>{[round(x, 3) for x in r['learned']]}</td>"
                            f"<td>{[round(x, 3) for x in r['best']]}</td>"
                            f"<td>{r['l1']:.3f}</td></tr>")
        rows.append(f"<tr><th>{html.escape(model)}</th><td>mean</td><td></td><td></td>"
                    f"<td>{segs['mean_l1']:.3f}</td></tr>")
    if not rows:
        return ""
    return ('<table class="lifts"><caption>Learned mean weights per true segment vs the segment\'s best '
            "static weights (searched with the truth on valid)</caption>"
            "<thead><tr><th>model</th><th>segment</th><th>learned</th><th>best</th><th>L1</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


STATUS_CLASS = {"pass": "pos", "warn": "warn", "fail": "neg"}


def diagnostics_table(report: dict[str, Any]) -> str:
    """Every diagnostic check: status (coloured), what it is about, value, threshold and its sentence."""
    checks = (report.get("diagnostics") or {}).get("checks", [])
    if not checks:
        return "<p>No diagnostics (no logged positions and clicks, or a report written before them).</p>"
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(c['name'])}</th><td>{esc(c['policy'] or '')}</td>"
        f"<td class='{STATUS_CLASS[c['status']]}'>{esc(c['status'].upper())}</td><td>{_fmt(c['value'])}</td>"
        f"<td>{esc(c['threshold'])}</td><td class='text'>{esc(c['sentence'])}</td></tr>" for c in checks)
    return ('<table class="diagnostics"><caption>Checks of the logs against what the estimated flavour '
            "assumes (a FAIL: the truth-free judgement cannot be trusted; see docs/estimators.md)</caption>"
            "<thead><tr><th>check</th><th>policy</th><th>status</th><th>value</th><th>threshold</th>"
            f"<th>what it means</th></tr></thead><tbody>{rows}</tbody></table>")


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def fig_examination(theta: list[float], click_rates: list[float]) -> str | None:
    """Logged click rate by position relative to position 0, next to theta-hat: where the two part, the
    fit attributes the fall of clicks to the items (the logging ranks better ones first), not to position."""
    rates = np.array(click_rates[:len(theta)], dtype=float)
    if not theta or rates.size == 0 or not rates[0] > 0:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    x = np.arange(len(theta))
    ax.plot(x, theta, marker="o", ms=3, label="theta-hat (value model)")
    ax.plot(x[:rates.size], rates / rates[0], marker="s", ms=3, label="logged click rate / position 0's")
    ax.set_xlabel("logged position (0 = top)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Examination: theta-hat and the logged click rate by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_support(report: dict[str, Any]) -> str | None:
    """Each policy's share of value on low-support items, against the fail threshold."""
    checks = [c for c in (report.get("diagnostics") or {}).get("checks", [])
              if c["name"] == "low_support" and c["value"] is not None]
    if not checks:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(checks) + 1.3))
    colour = {"pass": "tab:green", "warn": "tab:orange", "fail": "tab:red"}
    y = np.arange(len(checks))
    ax.barh(y, [100 * c["value"] for c in checks], color=[colour[c["status"]] for c in checks])
    limit = report.get("config", {}).get("diagnostics", {}).get("max_low_support_share")
    if limit is not None:
        ax.axvline(100 * limit, color="black", lw=0.8, ls="--", label="fail above (judged policies)")
        ax.legend(fontsize=8)
    ax.set_yticks(y, [c["policy"] for c in checks])
    ax.invert_yaxis()
    ax.set_xlabel("share of the policy's value on low-support items (%)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def fig_lifts(lifts: dict[str, Any], flavour: str, colours: dict[str, Any]) -> str | None:
    plt = _mpl()
    names = [p for p in lifts if lifts[p].get(flavour)]
    metrics = [m for m in ("ctr", "cvr", "opm", "gpm") if any(m in lifts[p][flavour] for p in names)]
    if not names or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.45 * len(names) + 1.4),
                             sharey=True, squeeze=False)
    y = np.arange(len(names))
    for ax, m in zip(axes[0], metrics, strict=True):
        vals = [lifts[p][flavour].get(m) for p in names]
        lift = np.array([100 * v["lift"] if v else np.nan for v in vals])
        lo = np.array([100 * (v["lift"] - v["ci_low"]) if v else 0 for v in vals])
        hi = np.array([100 * (v["ci_high"] - v["lift"]) if v else 0 for v in vals])
        ax.barh(y, lift, xerr=np.vstack([lo, hi]), color=[colours[p] for p in names], capsize=3, alpha=0.85)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(m.upper())
        ax.set_xlabel("lift vs static (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{flavour} lifts vs static with paired bootstrap CIs", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (maximising both), sorted by x."""
    order = np.lexsort((-y, -x))
    keep, best_y = [], -np.inf
    for i in order:
        if y[i] > best_y:
            keep.append(i)
            best_y = y[i]
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def fig_frontier(report: dict[str, Any], colours: dict[str, Any]) -> str | None:
    fr = report.get("frontier") or {}
    if "ctr" not in fr or "gpm" not in fr:
        return None
    plt = _mpl()
    flavour = fr["flavour"]
    x, y = np.array(fr["ctr"]), np.array(fr["gpm"])
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    ax.scatter(x, y, s=12, color="0.7", label="global weight vectors (simplex grid)")
    front = _pareto(x, y)
    ax.plot(x[front], y[front], color="0.35", lw=1.2, label="static frontier")
    for name, p in report["policies"].items():
        v = p.get(flavour, {})
        if "ctr" in v and "gpm" in v:
            ax.scatter([v["ctr"]], [v["gpm"]], s=70, marker="D" if name in ("static", "best_static") else "o",
                       color=colours[name], edgecolor="black", zorder=3, label=name)
            ax.annotate(name, (v["ctr"], v["gpm"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"{flavour} CTR")
    ax.set_ylabel(f"{flavour} GPM (GMV per 1000 impressions)")
    ax.set_title("CTR-GPM trade-off: static weights vs learned policies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def fig_weights(name: str, w: torch.Tensor, seg: torch.Tensor, labels: dict[int, str], segment_ids: list[int],
                objectives: list[str]) -> str:
    plt = _mpl()
    k = w.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(segment_ids) * k / 2 + 2), 3.8))
    cmap = plt.get_cmap("Set2")
    width = 0.8 / k
    for j in range(k):
        data = [w[seg == s, j][:MAX_POINTS_PER_SEGMENT].numpy() for s in segment_ids]
        pos = np.arange(len(segment_ids)) + (j - (k - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False,
                        medianprops={"color": "black"})
        for box in bp["boxes"]:
            box.set_facecolor(cmap(j))
        ax.plot([], [], color=cmap(j), lw=6, label=f"w_{objectives[j]}")
    ax.set_xticks(np.arange(len(segment_ids)), [labels.get(s, str(s)) for s in segment_ids])
    ax.set_xlabel("segment")
    ax.set_ylabel("fusion weight")
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: weights per segment")
    ax.legend(fontsize=8, ncol=k)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def curve_series(log_rows: list[dict[str, Any]],
                 max_series: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric series of a train_log.jsonl worth plotting (losses, rewards, KL, ...): key -> (x, y)."""
    keys: dict[str, None] = {}
    for row in log_rows:
        for key, v in row.items():
            plottable = isinstance(v, (int, float)) and not isinstance(v, bool)
            if plottable and any(h in key.lower() for h in CURVE_HINTS):
                keys.setdefault(key, None)
    out = {}
    for key in list(keys)[:max_series]:
        pts = [(row.get("step", i), row[key]) for i, row in enumerate(log_rows)
               if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if len(pts) >= 2:
            xs, ys = zip(*pts, strict=True)
            out[key] = (np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    return out


def fig_curves(name: str, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    plt = _mpl()
    n = len(series)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (key, (x, y)) in zip(axes.flat, series.items(), strict=False):
        ax.plot(x, y, lw=0.8, alpha=0.45, color="tab:blue")
        if len(y) >= 10:  # a moving average shows the trend through per-step noise
            win = max(3, len(y) // 20)
            smooth = np.convolve(y, np.ones(win) / win, mode="valid")
            ax.plot(x[win - 1:], smooth, lw=1.6, color="tab:blue")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{name}: training curves", fontsize=11)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
 color:#222;padding:0 16px;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
table{border-collapse:collapse;margin:12px 0;font-size:0.88em}th,td{border:1px solid #ddd;padding:4px 8px;
 text-align:right}thead th{background:#f3f5f8}tbody th{text-align:left;background:#fafafa}
caption{text-align:left;font-weight:600;padding:4px 0}.pos{color:#137333;font-weight:600}
.neg{color:#b3261e;font-weight:600}.zero{color:#555}figure{margin:10px 0}img{max-width:100%;height:auto}
.summary{background:#f3f7fd;border-left:4px solid #3b73c4;padding:10px 14px}.meta{color:#666;font-size:0.9em}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:0.8em}.warn{color:#9a5b00;font-weight:600}
td.text{text-align:left;max-width:560px}
"""


def render_html(report: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
                segments: tuple[str, torch.Tensor, dict[int, str]] | None = None,
                curves: dict[str, dict[str, Any]] | None = None,
                click_rates: list[float] | None = None) -> str:
    """The whole report page. ``weights``: per-request weights [N, K] of each policy (for the per-segment
    plots); ``segments``: (feature, ids [N], id -> label); ``curves``: per model, metrics.json/train_log;
    ``click_rates``: the logged click rate by position (grade.evaluate.diagnostics.click_profile)."""
    import json

    colours = _colours(list(report["policies"]))
    flavour = report["primary_flavour"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>GRADE-MTF offline evaluation</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>GRADE-MTF offline evaluation</h1>",
        f"<p class='meta'>{report['n_requests']} held-out requests ({esc(report['split'])} split), top-"
        f"{report['exposure_depth']} exposure, objectives {esc(', '.join(report['objectives']))}; "
        f"{'with' if report['has_ground_truth'] else 'without'} simulator ground truth. "
        f"Lifts: {report['config']['confidence']:.0%} {esc(report['config'].get('interval', 'percentile'))} "
        f"CIs of a paired bootstrap over requests "
        f"({report['config']['bootstrap_samples']} resamples).</p>",
        "<h2>Summary</h2>",
        f"<p class='summary'>{esc(report['headroom_sentence'])}</p>",
        lifts_table(report["lift_vs_static"], flavour, "static"),
    ]
    if "lift_vs_incumbent" in report:
        parts.append(lifts_table(report["lift_vs_incumbent"], flavour, "incumbent (production)"))
    for baseline, lifts in report.get("lift_vs", {}).items():
        parts.append(lifts_table({p: v for p, v in lifts.items() if p != baseline}, flavour, baseline))
    parts += ["<h2>Diagnostics</h2>", diagnostics_table(report)]
    for b64, alt in ((fig_examination(report.get("value_model", {}).get("theta", []), click_rates or []),
                      "theta-hat and the logged click rate by position"),
                     (fig_support(report), "share of value on low-support items per policy")):
        if b64:
            parts.append(_img(b64, alt))
    parts += ["<h2>Metrics</h2>",
              "<p class='meta'>CTR = clicks/impressions, CVR = orders/clicks, OPM and GPM = orders and GMV "
              "per 1000 impressions (expected values on the exposure); replay = NDCG@E against logged labels "
              "and GAUC of clicks. Flavours: " + "; ".join(FLAVOUR_TITLES.values()) + ".</p>",
              metrics_table(report), "<h2>Lifts vs static</h2>"]
    b64 = fig_lifts(report["lift_vs_static"], flavour, colours)
    if b64:
        parts.append(_img(b64, "lift bars with confidence intervals"))
    parts.append("<h2>Trade-off frontier</h2>")
    b64 = fig_frontier(report, colours)
    parts.append(_img(b64, "CTR-GPM trade-off frontier") if b64
                 else "<p>Not available (needs ctr, cvr and gmv).</p>")

    parts.append("<h2>Learned weights per segment</h2>")
    if weights and segments and segments[0]:
        feature, seg, labels = segments
        ids = _ids_of(report["segments"]["by_segment"], labels)
        for name, w in weights.items():
            if name in ("static", "best_static"):
                continue
            parts.append(_img(fig_weights(name, w, seg, labels, ids, report["objectives"]),
                              f"{name} weights per segment"))
        parts.append(f"<p class='meta'>Segments: {esc(feature)}. Static weights "
                     f"{esc(str([round(x, 3) for x in report['weights']['static']]))}"
                     + (f", best_static {esc(str([round(x, 3) for x in report['weights']['best_static']]))}"
                        if "best_static" in report["weights"] else "") + ".</p>")
        parts.append(segments_table(report))
        parts.append(l1_table(report))
    else:
        parts.append("<p>No segment feature.</p>")
    parts += ["<h2>Estimator check</h2>", estimator_check_tables(report)]

    parts.append("<h2>Training curves</h2>")
    drawn = 0
    for name, c in (curves or {}).items():
        series = curve_series(c.get("train_log", []))
        if series:
            parts.append(_img(fig_curves(name, series), f"{name} training curves"))
            drawn += 1
        if c.get("metrics"):
            parts.append(f"<details><summary>{esc(name)} metrics.json</summary><pre>"
                         f"{esc(json.dumps(c['metrics'], indent=1, sort_keys=True, default=str)[:6000])}"
                         "</pre></details>")
    if not drawn:
        parts.append("<p>No training logs in the model folders.</p>")

    provenance = {"models": report["models"], "features": report.get("features"), "config": report["config"]}
    parts += ["<h2>Models and configuration</h2>",
              f"<pre>{esc(json.dumps(provenance, indent=1, sort_keys=True, default=str))}</pre>",
              "</body></html>"]
    return "\n".join(parts)


def _ids_of(by_segment: dict[str, Any], labels: dict[int, str]) -> list[int]:
    """Segment ids of the breakdown's labels (labels are ids as text unless a vocabulary maps them)."""
    inverse = {v: k for k, v in labels.items()}
    out = []
    for label in by_segment:
        if label in inverse:
            out.append(inverse[label])
        else:
            try:
                out.append(int(label))
            except ValueError:
                continue
    return out
