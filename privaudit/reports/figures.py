"""Report figures (matplotlib, Agg backend; no pyplot global state).

Every figure is readable in black and white: series differ by marker and line style, colour only
helps. Runs without a formal guarantee (ε = ∞) are drawn at a separate right-hand (or top) "∞"
position behind a dashed separator, never at 0; runs whose ε is not available are left out and
named in a note on the axes.

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save_png` writes one to disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from privaudit.reports.runs_table import ACCOUNTANTS, RunRecord, format_epsilon  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "*", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
COLOURS = ("#1f3b73", "#b2182b", "#2b7a3d", "#7b3294", "#8c510a", "#404040", "#01665e", "#c51b7d")
ACCOUNTANT_MARKERS = {"rdp": "s", "pld": "o", "prv": "^"}
ACCOUNTANT_MARKER_SIZE = {"rdp": 6, "pld": 8, "prv": 4.5}
ACCOUNTANT_FILLED = {"rdp": False, "pld": False, "prv": True}
NO_GUARANTEE_MARKER = "X"
FIGSIZE = (6.4, 4.0)
ACCOUNTANT_NAMES = {"rdp": "RDP", "pld": "PLD", "prv": "PRV"}


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG (creating the parent folder)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, format="png")
    return p


NO_DATA_LABEL = "no data"


def has_data(fig: Figure) -> bool:
    """False for a figure that only says there is nothing to plot."""
    return fig.get_label() != NO_DATA_LABEL


def _no_data(ax: Axes, text: str) -> None:
    ax.figure.set_label(NO_DATA_LABEL)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _note(ax: Axes, text: str, max_chars: int = 400) -> None:
    """A small note under the axes (below the x label), kept inside the figure by the layout: wrapped
    to the figure's width and cut at ``max_chars`` (a long unwrapped line would squeeze the axes to
    nothing)."""
    import textwrap

    short = textwrap.shorten(text, width=max_chars, placeholder=" …")
    ax.annotate("\n".join(textwrap.wrap(short, width=110)), xy=(0, 0), xycoords="axes fraction",
                xytext=(0, -30), textcoords="offset points", fontsize=7, color="0.25", ha="left", va="top",
                annotation_clip=False)


class _InfAxis:
    """Linear axis over [0, max finite] with an extra "∞" position past a dashed separator."""

    def __init__(self, finite: Sequence[float], has_inf: bool, lower: float = 0.0) -> None:
        hi = max([v for v in finite if math.isfinite(v)], default=1.0)
        self.lower = min(lower, min(finite, default=lower))
        self.hi = hi if hi > self.lower else self.lower + 1.0
        span = self.hi - self.lower
        self.has_inf = has_inf
        self.sep = self.hi + 0.12 * span
        self.inf_pos = self.hi + 0.24 * span

    def pos(self, v: float) -> float:
        return self.inf_pos if math.isinf(v) else v

    def apply(self, ax: Axes, axis: str = "x") -> None:
        span = self.hi - self.lower
        ticks = [t for t in MaxNLocator(nbins=6).tick_values(self.lower, self.hi)
                 if self.lower - 1e-12 <= t <= self.hi + 1e-12]
        labels = [f"{t:g}" for t in ticks]
        upper = self.hi + 0.05 * span
        if self.has_inf:
            ticks.append(self.inf_pos)
            labels.append("∞")
            upper = self.inf_pos + 0.08 * span
        lo = self.lower - 0.04 * span
        if axis == "x":
            ax.set_xlim(lo, upper)
            ax.set_xticks(ticks, labels)
            if self.has_inf:
                ax.axvline(self.sep, color="0.5", linestyle=(0, (2, 2)), linewidth=0.8)
        else:
            ax.set_ylim(lo, upper)
            ax.set_yticks(ticks, labels)
            if self.has_inf:
                ax.axhline(self.sep, color="0.5", linestyle=(0, (2, 2)), linewidth=0.8)


def _utility_label(name: str, split: str | None) -> str:
    where = f", {split}" if split else ""
    if name.lower() == "perplexity":
        return f"perplexity{where} (lower is better)"
    if name.lower() in ("loss", "cross_entropy"):
        return f"{name}{where} (lower is better)"
    return f"{name}{where} (higher is better)"


def _eps_label(acc: str | None) -> str:
    return f"accounted ε ({ACCOUNTANT_NAMES.get(acc or '', acc)})" if acc else "accounted ε"


def _primary_accountant(records: Sequence[RunRecord]) -> str | None:
    accs = [r.primary_epsilon[1] for r in records if r.primary_epsilon[1]]
    return max(set(accs), key=accs.count) if accs else None


# --------------------------------------------------------------------------------------- figures
def eps_vs_utility(records: Sequence[RunRecord]) -> Figure:
    """Utility against the headline accounted ε: a curve per mechanism (line style); the marker names
    the accountant."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if r.utility_name and r.utility_value is not None:
            groups.setdefault(r.utility_name, []).append(r)
    n = max(1, len(groups))
    fig = _figure((FIGSIZE[0] * (1 if n == 1 else 0.62 * n), FIGSIZE[1]))
    axes = fig.subplots(1, n, squeeze=False)[0]
    if not groups:
        _no_data(axes[0], "no run records a utility metric")
        return fig
    mechanisms = sorted({r.mechanism for r in records})
    for ax, (uname, recs) in zip(axes, sorted(groups.items())):
        points: dict[tuple[str, str], list[tuple[float, float]]] = {}
        inf_points: list[tuple[str, float]] = []
        missing: list[str] = []
        for r in recs:
            assert r.utility_value is not None
            if r.has_guarantee is False:
                inf_points.append((r.mechanism, r.utility_value))
                continue
            eps, acc = r.primary_epsilon  # the report's one headline accountant, not all three
            if eps is not None and acc is not None and math.isfinite(eps):
                points.setdefault((r.mechanism, acc), []).append((eps, r.utility_value))
            else:
                missing.append(r.label)
        finite = [e for pts in points.values() for e, _ in pts]
        xa = _InfAxis(finite, bool(inf_points))
        for (mech, acc), pts in sorted(points.items()):
            i = mechanisms.index(mech)
            pts.sort()
            colour = COLOURS[i % len(COLOURS)]
            ax.plot([e for e, _ in pts], [u for _, u in pts], linestyle=LINESTYLES[i % len(LINESTYLES)],
                    marker=ACCOUNTANT_MARKERS.get(acc, "o"), color=colour,
                    markerfacecolor=colour if ACCOUNTANT_FILLED.get(acc, True) else "white",
                    markersize=ACCOUNTANT_MARKER_SIZE.get(acc, 6), linewidth=1.3)
        for mech, u in inf_points:
            i = mechanisms.index(mech)
            ax.plot([xa.inf_pos], [u], marker=NO_GUARANTEE_MARKER, color=COLOURS[i % len(COLOURS)],
                    markersize=9, linestyle="none")
        xa.apply(ax, "x")
        ax.set_xlabel(_eps_label(_primary_accountant(recs)) + " (∞ = no formal guarantee)")
        split = next((r.utility_split for r in recs if r.utility_split), None)
        ax.set_ylabel(_utility_label(uname, split))
        ax.grid(True, color="0.9")
        handles = [Line2D([], [], color=COLOURS[mechanisms.index(m) % len(COLOURS)],
                          linestyle=LINESTYLES[mechanisms.index(m) % len(LINESTYLES)], label=m)
                   for m in sorted({r.mechanism for r in recs})]
        used_accs = sorted({acc for (_, acc) in points}, key=lambda a: ACCOUNTANTS.index(a)
                           if a in ACCOUNTANTS else 99)
        handles += [Line2D([], [], color="black", marker=ACCOUNTANT_MARKERS.get(a, "o"), linestyle="none",
                           markerfacecolor="black" if ACCOUNTANT_FILLED.get(a, True) else "white",
                           markersize=ACCOUNTANT_MARKER_SIZE.get(a, 6),
                           label=ACCOUNTANT_NAMES.get(a, a)) for a in used_accs]
        if inf_points:
            handles.append(Line2D([], [], color="black", marker=NO_GUARANTEE_MARKER, linestyle="none",
                                  label="no guarantee"))
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.9)
        if missing:
            _note(ax, "ε not available: " + ", ".join(missing))
    fig.suptitle("Utility vs accounted ε", fontsize=11)
    return fig


def attack_success_vs_eps(records: Sequence[RunRecord]) -> Figure:
    """Attack AUC (with its confidence interval) against the accounted ε, a marker per attack."""
    fig = _figure()
    ax = fig.subplots()
    acc = _primary_accountant(records)
    rows: list[tuple[float, str, float, tuple[float, float] | None]] = []
    missing: list[str] = []
    for r in records:
        eps, _ = r.primary_epsilon
        for a in r.attacks:
            if a.auc is None:
                continue
            if eps is None:
                missing.append(r.label)
                continue
            rows.append((eps, a.name, a.auc, a.auc_ci))
    if not rows:
        _no_data(ax, "no attack with an AUC and an accounted ε")
        return fig
    names = sorted({n for _, n, _, _ in rows})
    xa = _InfAxis([e for e, *_ in rows if math.isfinite(e)], any(math.isinf(e) for e, *_ in rows))
    offset = 0.012 * (xa.inf_pos - xa.lower)
    for j, name in enumerate(names):
        pts = sorted((xa.pos(e) + (j - (len(names) - 1) / 2) * offset, auc, ci)
                     for e, n, auc, ci in rows if n == name)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        err = [[max(0.0, y - (ci[0] if ci else y)) for _, y, ci in pts],
               [max(0.0, (ci[1] if ci else y) - y) for _, y, ci in pts]]
        ax.errorbar(xs, ys, yerr=err, marker=MARKERS[j % len(MARKERS)], linestyle="none",
                    color=COLOURS[j % len(COLOURS)], capsize=3, markersize=6, label=name)
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
    xa.apply(ax, "x")
    ax.set_xlabel(_eps_label(acc) + " (∞ = no formal guarantee)")
    ax.set_ylabel("attack AUC (bars: confidence interval)")
    lowest = min(min(auc, ci[0] if ci else auc) for _, _, auc, ci in rows)
    ax.set_ylim(min(0.4, lowest - 0.05), 1.02)
    ax.grid(True, color="0.9")
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    if missing:
        _note(ax, "ε not available: " + ", ".join(sorted(set(missing))))
    ax.set_title("Attack success vs accounted ε", fontsize=11)
    return fig


def empirical_vs_accounted(records: Sequence[RunRecord]) -> Figure:
    """Empirical ε lower bound against the accounted ε, with y = x and claimed ε marked.

    A point above the y = x line (or above its claim's bar) is a violation: the audit proved more
    leakage than the accountant (or the claim) allows.
    """
    fig = _figure()
    ax = fig.subplots()
    acc = _primary_accountant(records)
    pts: list[tuple[float, float, RunRecord]] = []
    claims: list[tuple[float, float]] = []
    missing: list[str] = []
    for r in records:
        eps, _ = r.primary_epsilon
        if eps is None:
            if r.epsilon_lower is not None or r.claims:
                missing.append(r.label)
            continue
        if r.epsilon_lower is not None:
            pts.append((eps, r.epsilon_lower, r))
        for c in r.claims:
            claims.append((eps, c.epsilon))
    if not pts and not claims:
        _no_data(ax, "no empirical ε lower bound or claim to compare")
        return fig
    xs_f = [e for e, _, _ in pts if math.isfinite(e)] + [e for e, _ in claims if math.isfinite(e)]
    has_inf = any(math.isinf(e) for e, _, _ in pts) or any(math.isinf(e) for e, _ in claims)
    xa = _InfAxis(xs_f, has_inf)
    ymax = max([lo for _, lo, _ in pts] + [c for _, c in claims] + xs_f + [1.0])
    diag_hi = xa.hi
    ax.plot([0, diag_hi], [0, diag_hi], color="black", linestyle="--", linewidth=1,
            label="y = x (lower bound = accounted)")
    for eps, lo, r in pts:
        violation = (r.recheck or r.verdict) == "violation"
        ax.plot([xa.pos(eps)], [lo], marker="D" if violation else "o", linestyle="none", markersize=7,
                color=COLOURS[1] if violation else COLOURS[0],
                markerfacecolor=COLOURS[1] if violation else "white")
        ax.annotate(r.label + (" (violation)" if violation else ""), (xa.pos(eps), lo),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    for eps, c in claims:
        ax.plot([xa.pos(eps)], [c], marker="_", markersize=22, markeredgewidth=2.2, color=COLOURS[2],
                linestyle="none")
    for eps, lo, r in pts:  # dotted link from a claim to its run's lower bound
        for c in r.claims:
            ax.plot([xa.pos(eps)] * 2, [c.epsilon, lo], color=COLOURS[2], linestyle=":", linewidth=1)
    xa.apply(ax, "x")
    ax.set_ylim(0, ymax * 1.15 + 0.05)
    ax.set_xlabel(_eps_label(acc) + " (∞ = no formal guarantee)")
    conf = next((r.epsilon_lower_confidence for _, _, r in pts if r.epsilon_lower_confidence), None)
    ax.set_ylabel("empirical ε lower bound" + (f" ({conf:.0%} confidence)" if conf else ""))
    handles = [Line2D([], [], color="black", linestyle="--", label="y = x"),
               Line2D([], [], color=COLOURS[0], marker="o", markerfacecolor="white", linestyle="none",
                      label="ε lower bound"),
               Line2D([], [], color=COLOURS[1], marker="D", linestyle="none", label="violation")]
    if claims:
        handles.append(Line2D([], [], color=COLOURS[2], marker="_", markersize=14, markeredgewidth=2,
                              linestyle="none", label="claimed ε"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", framealpha=0.9)
    ax.grid(True, color="0.9")
    if missing:
        _note(ax, "accounted ε not available: " + ", ".join(missing))
    ax.set_title("Empirical vs accounted ε", fontsize=11)
    return fig


def roc_curves(record: RunRecord) -> Figure:
    """ROC curves of a run's attacks on log-log axes (low-FPR regime), with the chance line.

    Attacks without a stored ROC but with TPR at fixed FPR metrics are drawn as points.
    """
    fig = _figure()
    ax = fig.subplots()
    drawn = False
    min_fpr = 1.0
    for j, a in enumerate(record.attacks):
        style = dict(color=COLOURS[j % len(COLOURS)], linestyle=LINESTYLES[j % len(LINESTYLES)])
        auc = f" (AUC {a.auc:.3f})" if a.auc is not None else ""
        if a.fpr and a.tpr:
            pts = [(f, t) for f, t in zip(a.fpr, a.tpr) if f > 0 and t > 0]
            if pts:
                pts.sort()
                ax.plot([f for f, _ in pts], [t for _, t in pts], linewidth=1.4,
                        label=f"{a.name}{auc}", **style)
                min_fpr = min(min_fpr, pts[0][0])
                drawn = True
                continue
        fixed = []
        for key, v in a.metrics.items():
            if key.startswith("tpr_at_") and key.endswith("_fpr") and isinstance(v, (int, float)):
                try:
                    f = float(key[len("tpr_at_"):-len("_fpr")].rstrip("%")) / 100.0
                except ValueError:
                    continue
                if f > 0 and v > 0:
                    fixed.append((f, float(v)))
        if fixed:
            fixed.sort()
            ax.plot([f for f, _ in fixed], [t for _, t in fixed], marker=MARKERS[j % len(MARKERS)],
                    label=f"{a.name}{auc} (TPR at fixed FPR)", **style)
            min_fpr = min(min_fpr, fixed[0][0])
            drawn = True
    if not drawn:
        _no_data(ax, "no ROC data for this run")
        return fig
    lo = max(min(min_fpr, 1e-3) / 2, 1e-7)
    ax.plot([lo, 1], [lo, 1], color="0.4", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("false positive rate (log)")
    ax.set_ylabel("true positive rate (log)")
    ax.grid(True, which="major", color="0.9")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    ax.set_title(f"ROC curves: {record.label}", fontsize=11)
    return fig


def eps_over_steps(records: Sequence[RunRecord]) -> Figure:
    """ε spent after each number of training steps (Gaussian releases), recomputed from the ledger."""
    fig = _figure()
    ax = fig.subplots()
    series = [r for r in records if r.eps_over_steps]
    if not series:
        _no_data(ax, "no ledger with Gaussian releases to account step by step")
        return fig
    vals = [e for r in series for _, e in r.eps_over_steps]
    ya = _InfAxis([v for v in vals if math.isfinite(v)], any(math.isinf(v) for v in vals))
    for j, r in enumerate(series):
        xs = [k for k, _ in r.eps_over_steps]
        ys = [ya.pos(e) for _, e in r.eps_over_steps]
        acc = ACCOUNTANT_NAMES.get(r.eps_over_steps_accountant or "", r.eps_over_steps_accountant)
        ax.plot(xs, ys, color=COLOURS[j % len(COLOURS)], linestyle=LINESTYLES[j % len(LINESTYLES)],
                marker=MARKERS[j % len(MARKERS)], markersize=4, linewidth=1.3,
                label=f"{r.label} ({acc}; final ε {format_epsilon(r.eps_over_steps[-1][1])})")
    ya.apply(ax, "y")
    ax.set_xlabel("training steps (Gaussian releases)")
    ax.set_ylabel("ε spent" + (" (∞ = no formal guarantee)" if ya.has_inf else ""))
    delta = next((r.delta for r in series if r.delta), None)
    title = "ε spent over training" + (f" (δ = {delta:.3g})" if delta else "")
    ax.set_title(title, fontsize=11)
    ax.grid(True, color="0.9")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    others = [r.label for r in records if not r.eps_over_steps]
    if others:
        _note(ax, "not shown (no Gaussian releases or no accountant): " + ", ".join(others))
    return fig


def _rank_group(r: RunRecord) -> str:
    """Series label of a run in the rank figure: A public/secret and its noise level."""
    parts = [] if r.a_secret is None else [f"A {'secret' if r.a_secret else 'public'}"]
    sigma = r.noise_multiplier or 0.0
    parts.append(f"σ = {sigma:.3g}" if sigma > 0 else "no noise")
    return ", ".join(parts)


def attack_vs_rank(records: Sequence[RunRecord]) -> Figure:
    """Membership AUC (left) and the empirical ε lower bound (right) against the LoRA rank, one line
    style per series (A public / secret × noise level), a marker per attack; claimed ε and the
    accounted ε of noisy runs as reference lines. Only for runs that differ in rank (else "no data")."""
    fig = _figure((11.0, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ranked = [r for r in records if r.lora_rank is not None]
    if len({r.lora_rank for r in ranked}) < 2:
        _no_data(ax1, "the runs do not differ in LoRA rank")
        ax2.set_axis_off()
        return fig
    groups: dict[str, list[RunRecord]] = {}
    for r in ranked:
        groups.setdefault(_rank_group(r), []).append(r)
    attacks = sorted({a.name for r in ranked for a in r.attacks if a.auc is not None})
    ranks = sorted({r.lora_rank for r in ranked if r.lora_rank})
    for g, (label, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r.lora_rank or 0)
        ls = LINESTYLES[g % len(LINESTYLES)]
        colour = COLOURS[g % len(COLOURS)]
        for j, name in enumerate(attacks):
            pts = [(r.lora_rank, a.auc, a.auc_ci) for r in rs for a in r.attacks if a.name == name
                   and a.auc is not None]
            if not pts:
                continue
            ys = [p[1] for p in pts]
            err = [[max(0.0, y - (ci[0] if ci else y)) for _, y, ci in pts],
                   [max(0.0, (ci[1] if ci else y) - y) for _, y, ci in pts]]
            ax1.errorbar([p[0] for p in pts], ys, yerr=err, marker=MARKERS[j % len(MARKERS)], linestyle=ls,
                         color=colour, capsize=2, markersize=5, markerfacecolor="white",
                         label=f"{label}: {name}")
        low = [(r.lora_rank, r.epsilon_lower) for r in rs if r.epsilon_lower is not None]
        if low:
            ax2.plot([x for x, _ in low], [y for _, y in low], marker=MARKERS[g % len(MARKERS)], linestyle=ls,
                     color=colour, markerfacecolor="white", label=f"{label}: ε lower bound")
        acc = [(r.lora_rank, r.primary_epsilon[0]) for r in rs]
        if all(e is not None and math.isfinite(e) for _, e in acc):
            ax2.plot([x for x, _ in acc], [e for _, e in acc], linestyle=ls, color="black", linewidth=1,
                     marker="_", markersize=10, label=f"{label}: accounted ε")
    claims = sorted({c.epsilon for r in ranked for c in r.claims})
    for k, c in enumerate(claims):
        ax2.axhline(c, color=COLOURS[1], linestyle=LINESTYLES[(k + 1) % len(LINESTYLES)], linewidth=1.2,
                    label=f"claimed ε = {c:g}")
    ax1.axhline(0.5, color="0.4", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(x) for x in ranks])
        ax.minorticks_off()
        ax.set_xlabel("LoRA rank r")
        ax.grid(True, color="0.9")
        ax.legend(fontsize=6, loc="best", framealpha=0.9)
    ax1.set_ylabel("attack AUC (bars: confidence interval)")
    ax1.set_title("Membership / canary AUC vs rank", fontsize=11)
    conf = next((r.epsilon_lower_confidence for r in ranked if r.epsilon_lower_confidence), None)
    ax2.set_ylabel("empirical ε lower bound" + (f" ({conf:.0%} confidence)" if conf else ""))
    ax2.set_ylim(bottom=0)
    ax2.set_title("Empirical ε lower bound vs rank", fontsize=11)
    return fig


#: Figures drawn only when they apply (no "not shown" note otherwise).
OPTIONAL_FIGURES: frozenset[str] = frozenset({"attack_vs_rank"})

COMPARISON_FIGURES: dict[str, Any] = {
    "eps_vs_utility": eps_vs_utility,
    "attack_success_vs_eps": attack_success_vs_eps,
    "empirical_vs_accounted": empirical_vs_accounted,
    "eps_over_steps": eps_over_steps,
    "attack_vs_rank": attack_vs_rank,
}


# --------------------------------------------------------------------------------------- studies
def attack_success_vs_utility_drop(rows: Sequence[dict[str, Any]]) -> Figure:
    """PrivTune study (:func:`privaudit.studies.privtune.run_study` rows): each attack's success
    against the utility drop, one series per noise mode (markers) and attack (line style). Left:
    inversion token recovery; right: attribute-inference accuracy with the majority baseline (dotted).
    Rows without a utility drop (no ``none`` point in the grid) are left out and counted in a note."""
    fig = _figure((9.6, 4.0))
    ax_inv, ax_att = fig.subplots(1, 2)
    usable = [r for r in rows if isinstance(r.get("utility_drop"), (int, float))]
    if not usable:
        fig.set_label(NO_DATA_LABEL)
        _no_data(ax_inv, "no study row has a utility drop")
        _no_data(ax_att, "")
        return fig
    modes = list(dict.fromkeys(r["mode"] for r in usable))
    names = list(dict.fromkeys(a["name"] for r in usable for a in r.get("attacks", [])))
    baselines: list[float] = []
    for ax, kind, key in ((ax_inv, "inversion", "token_recovery"), (ax_att, "attribute", "accuracy")):
        for j, name in enumerate(n for n in names if n.startswith(kind)):
            for i, mode in enumerate(modes):
                pts = []
                for r in usable:
                    if r["mode"] != mode:
                        continue
                    a = next((a for a in r.get("attacks", []) if a["name"] == name), None)
                    v = (a or {}).get("metrics", {}).get(key)
                    if isinstance(v, (int, float)):
                        pts.append((float(r["utility_drop"]), float(v)))
                        if kind == "attribute" and isinstance(a["metrics"].get("majority_baseline"), (int, float)):
                            baselines.append(float(a["metrics"]["majority_baseline"]))
                if not pts:
                    continue
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                        linestyle=LINESTYLES[j % len(LINESTYLES)], color=COLOURS[i % len(COLOURS)],
                        markerfacecolor="none" if j % 2 else COLOURS[i % len(COLOURS)],
                        label=f"{mode} · {name.split('_', 1)[1]}")
        ax.set_xlabel("utility drop (clean − noisy accuracy)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    if baselines:
        ax_att.axhline(sorted(baselines)[len(baselines) // 2], color="black", linestyle=":", linewidth=1,
                       label="majority baseline")
    ax_inv.set_ylabel("token recovery")
    ax_inv.set_title("Inversion of the server's view", fontsize=11)
    ax_att.set_ylabel("attribute accuracy")
    ax_att.set_title("Attribute inference", fontsize=11)
    for ax in (ax_inv, ax_att):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, loc="best")
    left_out = len(rows) - len(usable)
    if left_out:
        _note(ax_inv, f"{left_out} row(s) without a utility drop not shown")
    return fig
