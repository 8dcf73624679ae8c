"""The PDF report (reportlab platypus): a summary of all runs, the comparison figures, one section per run.

Text uses DejaVu Sans / DejaVu Sans Mono from matplotlib's bundled fonts, registered as TrueType so
that they are embedded (reportlab's standard 14 fonts are not, and lack glyphs such as ε, δ, ∞).
Every page carries "page N of M".
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas as rl_canvas
from reportlab.platypus import (
    CondPageBreak,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from privaudit.reports.runs_table import (
    BOUND_TITLES,
    RunRecord,
    format_delta,
    format_epsilon,
    format_number,
)

FONT = "DejaVuSans"
FONT_BOLD = "DejaVuSans-Bold"
FONT_MONO = "DejaVuSansMono"
ACCOUNTANT_TITLES = {"rdp": "RDP", "pld": "PLD", "prv": "PRV"}

SECTION_TITLES = {
    "executive": "Executive summary",
    "summary": "Summary of runs",
    "comparison": "Comparison figures",
    "details": "Run details",
    "verdict": "Verdict",
    "accountants": "Accountants",
    "claims": "Claimed vs accounted vs empirical ε",
    "attacks": "Attacks",
    "figures": "Figures",
    "ledger": "Ledger verification",
    "versions": "Library versions",
    "guarantee": "What is and is not guaranteed",
    "warnings": "Warnings",
}


def register_fonts() -> None:
    """Register DejaVu Sans (regular, bold) and DejaVu Sans Mono from matplotlib's font folder."""
    if FONT in pdfmetrics.getRegisteredFontNames():
        return
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, fname in ((FONT, "DejaVuSans.ttf"), (FONT_BOLD, "DejaVuSans-Bold.ttf"),
                        (FONT_MONO, "DejaVuSansMono.ttf")):
        pdfmetrics.registerFont(TTFont(name, str(ttf / fname)))
    pdfmetrics.registerFontFamily(FONT, normal=FONT, bold=FONT_BOLD, italic=FONT, boldItalic=FONT_BOLD)


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName=FONT, fontSize=9, leading=12, alignment=TA_LEFT,
                          bulletFontName=FONT)
    return {
        "title": ParagraphStyle("title", parent=base, fontName=FONT_BOLD, fontSize=18, leading=22,
                                spaceAfter=6),
        "h1": ParagraphStyle("h1", parent=base, fontName=FONT_BOLD, fontSize=14, leading=18, spaceBefore=8,
                             spaceAfter=6),
        "h2": ParagraphStyle("h2", parent=base, fontName=FONT_BOLD, fontSize=11, leading=14, spaceBefore=8,
                             spaceAfter=4),
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=9.5),
        "cell": ParagraphStyle("cell", parent=base, fontSize=7.5, leading=9.5),
        "cellb": ParagraphStyle("cellb", parent=base, fontName=FONT_BOLD, fontSize=7.5, leading=9.5),
        "mono": ParagraphStyle("mono", parent=base, fontName=FONT_MONO, fontSize=7, leading=9),
        "bullet": ParagraphStyle("bullet", parent=base, leftIndent=10, bulletIndent=2, spaceAfter=2,
                                 bulletFontName=FONT),
        "caption": ParagraphStyle("caption", parent=base, fontSize=7.5, leading=9.5, textColor=colors.grey),
        "alarm": ParagraphStyle("alarm", parent=base, fontName=FONT_BOLD, textColor=colors.Color(0.72, 0.05, 0.05)),
    }


class _NumberedCanvas(rl_canvas.Canvas):
    """Defers page output so that each page can say "page N of M"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saved: list[dict[str, Any]] = []

    def showPage(self) -> None:  # noqa: N802 (reportlab API)
        self._saved.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._saved)
        for state in self._saved:
            self.__dict__.update(state)
            self.setFont(FONT, 7.5)
            self.setFillColor(colors.grey)
            w, _ = self._pagesize
            self.drawRightString(w - 18 * mm, 10 * mm, f"page {self._pageNumber} of {total}")
            self.drawString(18 * mm, 10 * mm, "privaudit report")
            super().showPage()
        super().save()


def _p(text: Any, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(str(text)), style)


def _table(rows: Sequence[Sequence[Any]], widths: Sequence[float], st: dict[str, ParagraphStyle],
           header: bool = True, mono_cols: Sequence[int] = ()) -> Table:
    cells = []
    for i, row in enumerate(rows):
        out = []
        for j, v in enumerate(row):
            if isinstance(v, (Paragraph, Image)):
                out.append(v)
            elif header and i == 0:
                out.append(_p(v, st["cellb"]))
            else:
                out.append(_p("—" if v is None or v == "" else v, st["mono"] if j in mono_cols else st["cell"]))
        cells.append(out)
    t = Table(cells, colWidths=list(widths), repeatRows=1 if header else 0, hAlign="LEFT")
    style = [
        ("GRID", (0, 0), (-1, -1), 0.4, colors.Color(0.6, 0.6, 0.6)),
        ("FONT", (0, 0), (-1, -1), FONT, 7.5),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.Color(0.88, 0.88, 0.88)))
    t.setStyle(TableStyle(style))
    return t


def _kv_grid(pairs: Sequence[tuple[str, Any]], width: float, st: dict[str, ParagraphStyle],
             mono_keys: Sequence[str] = (), wide_keys: Sequence[str] = ()) -> Table:
    """Key/value pairs two to a row (half the height of :func:`_kv_table`); ``wide_keys`` span the row."""
    rows: list[list[Any]] = []
    spans: list[int] = []
    pending: list[Any] = []

    def cell(k: str, v: Any) -> list[Any]:
        return [_p(k, st["cellb"]), _p("not recorded" if v is None or v == "" else v,
                                       st["mono"] if k in mono_keys else st["cell"])]

    for k, v in pairs:
        if k in wide_keys:
            spans.append(len(rows))
            rows.append(cell(k, v) + [_p("", st["cell"]), _p("", st["cell"])])
        elif pending:
            rows.append(pending + cell(k, v))
            pending = []
        else:
            pending = cell(k, v)
    if pending:
        rows.append(pending + [_p("", st["cell"]), _p("", st["cell"])])
    t = Table(rows, colWidths=[w * width for w in (0.15, 0.35, 0.15, 0.35)], hAlign="LEFT")
    style = [("GRID", (0, 0), (-1, -1), 0.4, colors.Color(0.6, 0.6, 0.6)),
             ("FONT", (0, 0), (-1, -1), FONT, 7.5),
             ("BACKGROUND", (0, 0), (0, -1), colors.Color(0.94, 0.94, 0.94)),
             ("BACKGROUND", (2, 0), (2, -1), colors.Color(0.94, 0.94, 0.94)),
             ("VALIGN", (0, 0), (-1, -1), "TOP"), ("TOPPADDING", (0, 0), (-1, -1), 2),
             ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]
    style += [("SPAN", (1, i), (3, i)) for i in spans]
    t.setStyle(TableStyle(style))
    return t


def _kv_table(pairs: Sequence[tuple[str, Any]], width: float, st: dict[str, ParagraphStyle],
              mono_keys: Sequence[str] = ()) -> Table:
    rows = []
    for k, v in pairs:
        style = st["mono"] if k in mono_keys else st["cell"]
        rows.append([_p(k, st["cellb"]), _p("not recorded" if v is None or v == "" else v, style)])
    t = Table(rows, colWidths=[0.28 * width, 0.72 * width], hAlign="LEFT")
    t.setStyle(TableStyle([
        ("GRID", (0, 0), (-1, -1), 0.4, colors.Color(0.6, 0.6, 0.6)),
        ("FONT", (0, 0), (-1, -1), FONT, 7.5),
        ("BACKGROUND", (0, 0), (0, -1), colors.Color(0.94, 0.94, 0.94)),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]))
    return t


def _image(path: Path, width: float, max_height: float) -> Image:
    iw, ih = ImageReader(str(path)).getSize()
    w = width
    h = w * ih / iw
    if h > max_height:
        h = max_height
        w = h * iw / ih
    return Image(str(path), width=w, height=h)


# --------------------------------------------------------------------------------------- text
def verdict_text(r: RunRecord) -> str:
    return r.verdict or ("not audited" if not r.has_audit else "not recorded")


def accounted_text(r: RunRecord) -> str:
    eps, acc = r.primary_epsilon
    if eps is None:
        return "not available"
    if math.isinf(eps):
        return "∞ (no guarantee)"
    return f"{format_epsilon(eps)} ({ACCOUNTANT_TITLES.get(acc or '', acc)})"


def claimed_text(r: RunRecord) -> str:
    return ", ".join(format_epsilon(c.epsilon) for c in r.claims) or "none"


def lower_text(r: RunRecord) -> str:
    if r.epsilon_lower is None:
        return "not available"
    conf = f" at {r.epsilon_lower_confidence:.0%}" if r.epsilon_lower_confidence else ""
    return f"{format_epsilon(r.epsilon_lower)}{conf}"


def utility_text(r: RunRecord) -> str:
    if r.utility_name is None or r.utility_value is None:
        return "not recorded"
    better = "lower is better" if r.utility_name.lower() == "perplexity" else "higher is better"
    split = f", {r.utility_split}" if r.utility_split else ""
    return f"{r.utility_name} {r.utility_value:.4g} ({better}{split})"


_UNIT = {"record": ("any single training record", "record"),
         "user": ("all the records of any single user", "user"),
         "client": ("all the data of any single client", "client")}
_RELATION = {"add_remove": "being added to or removed from the training data",
             "replace": "being replaced by a different one (the data-set size is treated as public)"}
_OBSERVER = {"released model": "the released model (its weights and anything computed from them)",
             "server": "everything the server receives during training"}


def guarantee_note(r: RunRecord) -> tuple[list[str], list[str], list[str]]:
    """Plain-language (what is guaranteed, under which assumptions, what is not), from the header."""
    unit_phrase, unit_noun = _UNIT.get(r.privacy_unit or "", (f"one {r.privacy_unit or 'unit'}",
                                                             r.privacy_unit or "unit"))
    relation = _RELATION.get(r.neighbouring or "", f"changing under the relation '{r.neighbouring}'"
                             if r.neighbouring else "changing (neighbouring relation not recorded)")
    observer = _OBSERVER.get(r.observer or "", f"'{r.observer}'" if r.observer else
                             "an observer that is not recorded")
    eps, acc = r.primary_epsilon
    hg = r.has_guarantee
    guaranteed: list[str] = []
    assumptions: list[str] = []
    not_guaranteed: list[str] = []
    if hg is True and eps is not None:
        d = format_delta(r.delta)
        guaranteed.append(
            f"(ε, δ)-differential privacy with ε = {format_epsilon(eps)} "
            f"({ACCOUNTANT_TITLES.get(acc or '', acc)} accountant) and δ = {d}: {unit_phrase} "
            f"{relation} changes the probability of anything seen by {observer} by at most a factor "
            f"e^ε = {math.exp(min(eps, 700)):.3g}, plus δ.")
        guaranteed.append(
            f"So no test of whether a given {unit_noun} was trained on can have a true-positive rate above "
            f"e^ε × its false-positive rate + δ.")
        if eps > 10:
            guaranteed.append(f"An ε of {format_epsilon(eps)} is a weak guarantee: the bound on the odds "
                              f"ratio (e^ε) is too large to rule out confident membership inference.")
    elif hg is False:
        guaranteed.append(f"No formal guarantee: {r.no_guarantee_reason or 'the mechanism makes none'}. "
                          "The attack results are evidence about this one model only; an attack that "
                          "fails does not show that the data are private.")
    else:
        guaranteed.append("The accounted ε is not available (no accountant could recompute it and the "
                          "manifest records none), so this report cannot state a guarantee.")
    if hg is not False:
        if r.ledger_status == "intact":
            assumptions.append("The ledger lists every release the observer sees (its hash chain verifies "
                               "as intact; completeness rests on the training code writing it).")
        else:
            assumptions.append(f"The ledger FAILED verification ({r.ledger_status}): the accounted ε "
                               "cannot be trusted.")
        if r.event_counts.get("gaussian"):
            assumptions.append(f"Each {unit_noun}'s contribution is clipped to the recorded norm and the "
                               "Gaussian noise has the recorded multiplier.")
            if r.sample_rate is not None and r.sample_rate < 1:
                assumptions.append(f"Batches are Poisson-sampled at rate q = {r.sample_rate:.3g} as "
                                   "recorded; shuffled fixed-size batches do not give this amplification.")
        if r.encrypted_security_bits:
            bits = min(r.encrypted_security_bits)
            assumptions.append(f"Encrypted exchanges ({bits}-bit security) reveal nothing to an observer "
                               "without the key.")
        assumptions.append("Noise comes from an adequate random source; floating-point effects are "
                           "ignored, as by all accountants.")
        assumptions.append("Choices made with the private data outside the ledger (hyper-parameter "
                           "tuning, early stopping, repeated runs) are not accounted.")
    if hg is False:
        not_guaranteed.append(f"Membership, attribute and content of training {unit_noun}s are not "
                              f"protected against {observer} or anyone else by any formal bound.")
    else:
        not_guaranteed.append(f"Other observers: the guarantee is only against {observer}; whoever sees "
                              "more (other parties, logs, intermediate checkpoints) is not covered.")
        if r.privacy_unit == "record":
            not_guaranteed.append("Record level, not person level: someone with k records in the data is "
                                  "protected only with k·ε (group privacy).")
        not_guaranteed.append("Inferences about the population (what holds for many records) are not "
                              "prevented, by design of differential privacy.")
    if r.base_model:
        not_guaranteed.append(f"Data the base model ({r.base_model}) was pre-trained on is not covered.")
    for c in r.claims:
        src = f" by {c.source}" if c.source else ""
        not_guaranteed.append(f"Claim{src} of ε = {format_epsilon(c.epsilon)} (δ = {format_delta(c.delta)})"
                              f": {c.status}.")
    if "violation" in (r.verdict, r.recheck):
        not_guaranteed.append("The audit found more leakage than allowed (a violation): an implementation "
                              "bug or a false claim. Do not rely on the stated ε.")
    return guaranteed, assumptions, not_guaranteed


# --------------------------------------------------------------------------------------- document
_VERDICT_COLOURS = {"consistent": colors.Color(0.1, 0.5, 0.2), "violation": colors.Color(0.75, 0.05, 0.05),
                    "inconclusive": colors.Color(0.75, 0.45, 0.0), "no guarantee": colors.Color(0.35, 0.35, 0.35)}
_RED = colors.Color(0.72, 0.05, 0.05)


def _verdict_colour(v: str) -> Any:
    return _VERDICT_COLOURS.get(v, _RED if v.startswith("not stated") else colors.Color(0.35, 0.35, 0.35))


def _banner(lines: Sequence[str], width: float, st: dict[str, ParagraphStyle]) -> Table:
    """A red box on page 1: the runs whose ledger fails the integrity check."""
    style = ParagraphStyle("banner", parent=st["body"], fontName=FONT_BOLD, textColor=colors.white,
                           fontSize=9.5, leading=12.5)
    t = Table([[Paragraph(escape(x), style)] for x in lines], colWidths=[width], hAlign="LEFT")
    t.setStyle(TableStyle([("FONT", (0, 0), (-1, -1), FONT, 7.5), ("BACKGROUND", (0, 0), (-1, -1), _RED), ("LEFTPADDING", (0, 0), (-1, -1), 6),
                           ("RIGHTPADDING", (0, 0), (-1, -1), 6), ("TOPPADDING", (0, 0), (-1, -1), 3),
                           ("BOTTOMPADDING", (0, 0), (-1, -1), 3)]))
    return t


def _exec_block(r: RunRecord, records: Sequence[RunRecord], width: float, st: dict[str, ParagraphStyle]
                ) -> KeepTogether:
    from privaudit.reports.summary import executive_summary, report_verdict

    v = report_verdict(r)
    hex_colour = _verdict_colour(v).hexval()[2:]
    head = Paragraph(f"{escape(r.label)} &nbsp;<font color='#{hex_colour}'>[{escape(v)}]</font>", st["h2"])
    rows = []
    for q, a in executive_summary(r, records):
        style = st["cell"]
        if (q == "guarantee" and a.startswith("NOT STATED")) or (q == "ledger integrity" and a.startswith("FAILED")):
            style = ParagraphStyle("alarm", parent=st["cellb"], textColor=_RED)
        elif q == "verdict":
            style = ParagraphStyle("verdict", parent=st["cellb"], textColor=_verdict_colour(v))
        rows.append([_p(q, st["cellb"]), _p(a, style)])
    t = Table(rows, colWidths=[0.21 * width, 0.79 * width], hAlign="LEFT")
    t.setStyle(TableStyle([("FONT", (0, 0), (-1, -1), FONT, 7.5), ("VALIGN", (0, 0), (-1, -1), "TOP"),
                           ("TOPPADDING", (0, 0), (-1, -1), 1),
                           ("BOTTOMPADDING", (0, 0), (-1, -1), 1), ("LEFTPADDING", (0, 0), (-1, -1), 2),
                           ("LINEBELOW", (0, -1), (-1, -1), 0.4, colors.Color(0.7, 0.7, 0.7))]))
    return KeepTogether([head, t])


def _summary_table(records: Sequence[RunRecord], width: float, st: dict[str, ParagraphStyle]) -> Table:
    from privaudit.reports.summary import report_verdict

    acc = next((r.headline_accountant for r in records if r.headline_accountant), None)
    rows: list[list[Any]] = [["run", "utility", f"accounted ε ({ACCOUNTANT_TITLES.get(acc or '', 'best available')})",
                              "claimed ε", "empirical ε lower [audit power]", "verdict"]]
    for r in records:
        power = f" [{format_epsilon(r.epsilon_lower_power)}]" if r.epsilon_lower_power is not None else ""
        rows.append([r.label, utility_text(r), accounted_text(r), claimed_text(r), lower_text(r) + power,
                     report_verdict(r)])
    return _table(rows, [f * width for f in (0.22, 0.2, 0.15, 0.1, 0.19, 0.14)], st)


_KNOWN_METRICS = ("auc", "auc_ci", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "roc")


def _other_metrics(metrics: Mapping[str, Any], limit: int = 5) -> str:
    """Scalar metrics as 'name value', formatted; lists and mappings are left to the CSV/JSON tables."""
    shown, hidden = [], 0
    for k, v in metrics.items():
        if k in _KNOWN_METRICS or k.endswith("_ci"):
            continue
        if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(float(v))):
            if len(shown) < limit:
                shown.append(f"{k.replace('_', ' ')} {_fmt_metric(v)}")
            else:
                hidden += 1
        elif isinstance(v, str) and len(v) <= 40 and len(shown) < limit:
            shown.append(f"{k.replace('_', ' ')}: {v}")
        elif v is not None:
            hidden += 1
    if hidden:
        shown.append(f"(+{hidden} more in the attacks CSV)")
    return "; ".join(shown) or "—"


def _attack_table(r: RunRecord, width: float, st: dict[str, ParagraphStyle]) -> list[Any]:
    rows: list[list[Any]] = [["attack", "kind", "AUC [95% CI]", "TPR at 0.1% FPR", "TPR at 1% FPR",
                              "ε lower [power]", "other metrics"]]
    conf = None
    for a in r.attacks:
        if a.kind in ("inversion", "attribute"):
            continue
        ci = a.auc_ci
        auc = (format_number(a.auc) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")) if a.auc is not None else "—"
        el = "no bound" if a.epsilon_lower is None else format_epsilon(a.epsilon_lower)
        if a.epsilon_lower is not None and a.epsilon_lower_method:
            el += f" ({BOUND_TITLES.get(a.epsilon_lower_method, a.epsilon_lower_method)})"
        if a.power is not None:
            el += f" [{format_epsilon(a.power)}]"
        conf = conf or a.family_confidence or a.epsilon_lower_confidence
        rows.append([a.name, a.kind, auc, _fmt_metric(a.metrics.get("tpr_at_0.1%_fpr")),
                     _fmt_metric(a.metrics.get("tpr_at_1%_fpr")), el, _other_metrics(a.metrics)])
    if len(rows) == 1:
        return []
    note = ("ε lower: the empirical lower bound this attack proves"
            + (f" (the audit's maximum holds at {conf:.0%} confidence, each bound at a Bonferroni-corrected "
               "level)" if conf else "")
            + "; (the bound it comes from: Steinke = Steinke, Nasr, Jagielski 2023, assumption-free; f-DP, "
            "Gaussian = Mahloujifar, Melis, Chaudhuri 2024 against Gaussian trade-off curves, assumes one; f-DP, "
            "accountant's curve = the same test against the accountant's own curve at scaled noise, assumes the "
            "accounted schedule)"
            + "; [power]: the largest bound its design could certify (perfect guesses). 'no bound': the attack's "
            "units were not included by fair coins, so it reports metrics only.")
    return [_table(rows, [width * f for f in (0.2, 0.11, 0.16, 0.08, 0.08, 0.11, 0.26)], st),
            _p(note, st["caption"])]


def _run_section(r: RunRecord, figures: Sequence[tuple[str, Path]], width: float,
                 st: dict[str, ParagraphStyle], letter: str = "", show_versions: bool = True) -> list[Any]:
    from privaudit.reports.summary import report_verdict, verdict_explanation

    H = SECTION_TITLES
    story: list[Any] = [CondPageBreak(70 * mm), _p(f"Appendix {letter}: {r.label}".replace(" : ", ": "), st["h1"])]

    # title block
    size = f"{r.dataset_size} records" if r.dataset_size is not None else None
    pairs = [
        ("run id", r.run_id), ("data fingerprint", r.dataset_fingerprint), ("run directory", str(r.path)),
        ("base model", r.base_model), ("task", r.task),
        ("data", ", ".join(x for x in (size, r.dataset_source) if x) or None),
        ("mechanism", r.mechanism), ("privacy unit", r.privacy_unit),
        ("neighbouring relation", r.neighbouring), ("δ", format_delta(r.delta)), ("observer", r.observer),
        ("noise multiplier σ", format_number(r.noise_multiplier) if r.noise_multiplier is not None else None),
        ("sample rate q", f"{r.sample_rate:.4g}" if r.sample_rate is not None else None),
        ("steps", r.steps), ("utility", utility_text(r)),
        ("train loss", format_number(r.train_loss) if r.train_loss is not None else None),
        ("created", r.created), ("status", r.status),
    ]
    story += [_p(H["details"], st["h2"]),
              _kv_grid(pairs, width, st, mono_keys=("data fingerprint", "run id"),
                       wide_keys=("run id", "data fingerprint", "run directory"))]

    # verdict
    v = report_verdict(r)
    verdict_rows = [["verdict", "why", "accounted ε", "empirical ε lower [power]", "claimed ε"],
                    [v, verdict_explanation(r), accounted_text(r),
                     lower_text(r) + (f" [{format_epsilon(r.epsilon_lower_power)}]"
                                      if r.epsilon_lower_power is not None else ""), claimed_text(r)]]
    story += [_p(H["verdict"], st["h2"]),
              _table(verdict_rows, [width * f for f in (0.13, 0.45, 0.14, 0.16, 0.12)], st)]
    if r.verdict and r.recheck and r.verdict != r.recheck:
        story.append(_p(f"audit.json says '{r.verdict}'; this report's re-check from the ledger says "
                        f"'{r.recheck}' (shown).", st["small"]))

    if r.guarantee_refused and r.has_guarantee is not False:
        story += [_p(H["accountants"], st["h2"]),
                  _p(f"No guarantee is stated: {r.guarantee_refused}.", st["alarm"])]
    else:
        # accountants side by side
        rows: list[list[Any]] = [["", *[ACCOUNTANT_TITLES.get(a.accountant, a.accountant) for a in r.accounted]]]
        rows.append(["ε reported", *[format_epsilon(a.value) for a in r.accounted]])
        rows.append(["recomputed from ledger", *[format_epsilon(a.recomputed) for a in r.accounted]])
        rows.append(["bounds [lower, upper]", *[
            f"[{format_number(a.lower)}, {format_number(a.upper)}]" if (a.lower is not None or a.upper is not None)
            else "—" for a in r.accounted]])
        rows.append(["recorded in manifest", *[format_epsilon(a.manifest) for a in r.accounted]])
        rows.append(["note", *[a.note or "" for a in r.accounted]])
        n = max(1, len(r.accounted))
        head = (f" The report's headline uses {ACCOUNTANT_TITLES.get(r.headline_accountant, r.headline_accountant)}."
                if r.headline_accountant else "")
        story += [_p(H["accountants"], st["h2"]),
                  _p(f"ε at δ = {format_delta(r.delta)} ({r.neighbouring or 'relation not recorded'} neighbours). "
                     f"Where the ledger and the manifest disagree, the larger ε is reported.{head}", st["small"]),
                  Spacer(1, 2),
                  _table(rows, [0.22 * width] + [0.78 * width / n] * n, st)]

    story += mechanism_guarantee_block(r, width, st)

    # claims (only where there is one: the accounted and empirical ε are in the verdict table)
    if r.claims:
        rows = [["claimed ε", "δ", "source", "scope", "status"]]
        for c in r.claims:
            rows.append([format_epsilon(c.epsilon), format_delta(c.delta), c.source or "—", c.scope or "—",
                         c.status])
        story += [_p(H["claims"], st["h2"]), _table(rows, [width * f for f in (0.12, 0.1, 0.22, 0.16, 0.4)], st)]

    # attacks
    story.append(_p(H["attacks"], st["h2"]))
    view = [a for a in r.attacks if a.kind in ("inversion", "attribute")]
    if view:
        story.append(view_attack_table(view, width, st))
    story += _attack_table(r, width, st)
    if not r.attacks:
        story.append(_p("No audit results (no audit.json)." if not r.has_audit else "audit.json lists no "
                        "attack.", st["body"]))

    for caption, path in figures:
        story.append(KeepTogether([Spacer(1, 4), _image(path, width * 0.62, 64 * mm), _p(caption, st["caption"])]))

    # ledger
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(r.event_counts.items())) or "none"
    integ = r.integrity
    story += [_p(H["ledger"], st["h2"]), _kv_table([
        ("hash chain", f"{r.ledger_status}: {r.ledger_message}"),
        ("integrity check", (("passed: " if integ.ok else "FAILED: ") + integ.reason) if integ else None),
        ("head hash", r.ledger_head),
        ("manifest's head hash", f"{r.manifest_ledger_head or 'not recorded'} "
                                 f"({integ.head_compared if integ else 'not compared'})"),
        ("releases by event type", counts),
    ], width, st, mono_keys=("head hash", "manifest's head hash"))]

    if show_versions:
        story += [_p(H["versions"], st["h2"]), *_versions_table(r.versions, width, st)]

    # plain-language note
    story.append(_p(H["guarantee"], st["h2"]))
    if r.guarantee_refused and r.has_guarantee is not False:
        story.append(_p(f"Nothing is guaranteed by this report: {r.guarantee_refused}.", st["alarm"]))
    else:
        g, a_, ng = guarantee_note(r)
        block: list[Any] = [_p("Guaranteed", st["cellb"])]
        block += [Paragraph(escape(t), st["bullet"], bulletText="•") for t in g]
        if a_:
            block.append(_p("Under these assumptions", st["cellb"]))
            block += [Paragraph(escape(t), st["bullet"], bulletText="•") for t in a_]
        block.append(_p("Not guaranteed", st["cellb"]))
        block += [Paragraph(escape(t), st["bullet"], bulletText="•") for t in ng]
        story += block

    if r.warnings:
        story.append(_p(H["warnings"], st["h2"]))
        story += [Paragraph(escape(w), st["bullet"], bulletText="!") for w in r.warnings]
    return story


def _versions_table(versions: Mapping[str, str], width: float, st: dict[str, ParagraphStyle]) -> list[Any]:
    if not versions:
        return [_p("not recorded in the manifest", st["body"])]
    vs = sorted(versions.items())
    third = (len(vs) + 2) // 3
    rows = [["library", "version"] * 3]
    for i in range(third):
        row: list[Any] = []
        for j in range(3):
            k = i + j * third
            row += list(vs[k]) if k < len(vs) else [_p("", st["cell"]), _p("", st["cell"])]
        rows.append(row)
    return [_table(rows, [width * f for f in (0.2, 0.13) * 3], st)]


def _rate_ci(m: Mapping[str, Any], key: str) -> str:
    v = m.get(key)
    if not isinstance(v, (int, float)):
        return "—"
    ci = m.get(f"{key}_ci")
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")


def view_attack_table(attacks: Sequence[Any], width: float, st: dict[str, ParagraphStyle]) -> Table:
    """Inversion and attribute attacks on an observer's view: success [CI] against chance / majority."""
    rows: list[list[Any]] = [["attack on the view", "success [95% CI]", "chance / majority", "PII exact [CI]",
                              "n", "note"]]
    for a in attacks:
        m = a.metrics
        if m.get("skipped"):
            rows.append([a.name, "—", "—", "—", "—", f"skipped: {m['skipped']}"])
            continue
        if a.kind == "inversion":
            rows.append([a.name, "token recovery " + _rate_ci(m, "token_recovery"),
                         _fmt_metric(m.get("chance_rate")), _rate_ci(m, "pii_exact"),
                         f"{m.get('n_tokens', '—')} tokens / {m.get('n_records', '—')} records",
                         "above chance" if m.get("beats_chance") else "not above chance"])
        else:
            rows.append([a.name, "accuracy " + _rate_ci(m, "accuracy"), _fmt_metric(m.get("majority_baseline")),
                         "—", str(m.get("n_test", "—")),
                         "beats the majority baseline" if m.get("beats_baseline") else "not above the baseline"])
    return _table(rows, [width * f for f in (0.25, 0.22, 0.12, 0.15, 0.12, 0.14)], st)


def mechanism_guarantee_block(r: RunRecord, width: float, st: dict[str, ParagraphStyle]) -> list[Any]:
    """The mechanism's own guarantees beside the (ε, δ) accountants: PrivTune's metric-DP report;
    HE-LoRA's guarantee against the worker and the released adapter's (none without DP noise)."""
    mp = r.mechanism_privacy
    if not mp:
        return []
    pairs: list[tuple[str, Any]] = []
    md = mp.get("metric_dp")
    if md:
        pairs += [
            ("metric-DP guarantee", md.get("guarantee")),
            ("η per unit distance", format_number(md.get("eta"), 4) if md.get("eta") is not None else None),
            ("η per dimension", format_number(md.get("eta_per_dimension"), 4)
             if md.get("eta_per_dimension") is not None else None),
            ("ε at the median NN distance", (f"{format_number(md.get('epsilon_at_median_nn'))} (distance "
                                             f"{format_number(md.get('median_nn_distance'))})")
             if md.get("epsilon_at_median_nn") is not None else None),
            ("composed over releases", format_number(md.get("epsilon_composed_at_median_nn"))
             if md.get("epsilon_composed_at_median_nn") is not None else None),
            ("token releases", md.get("token_releases")),
        ]
        pairs += [(f"caveat {i + 1}", c) for i, c in enumerate(md.get("caveats") or [])]
        pairs += [("not covered", o) for o in md.get("other_releases") or []]
    worker = mp.get("against_worker")
    if worker:
        pairs += [("against the worker", worker.get("statement")), ("mode", worker.get("mode")),
                  ("scheme / security", f"{worker.get('scheme')} / {worker.get('security_bits')} bits"),
                  ("encrypted exchanges", worker.get("encrypted_events")),
                  ("bytes to / from the worker", f"{worker.get('bytes_to_worker')} / {worker.get('bytes_from_worker')}"),
                  ("timing", worker.get("timing"))]
    released = mp.get("released_model")
    if released:
        g = released.get("guarantee")
        pairs.append(("released model", "NO GUARANTEE: " + str(released.get("reason")) if g == "none"
                      else f"{g}: {released.get('reason')}"))
    return [_p("Mechanism guarantees (beside the (ε, δ) accountants)", st["h2"]), _kv_table(pairs, width, st)]


def _fmt_metric(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format_number(v)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(format_number(float(x)) for x in v) + "]"
    return str(v)


def write_pdf(records: Sequence[RunRecord], out_pdf: str | Path, *,
              summary_figures: Sequence[tuple[str, Path]] = (),
              run_figures: Mapping[str, Sequence[tuple[str, Path]]] | None = None,
              summary_notes: Sequence[str] = (), title: str = "privaudit report") -> Path:
    """Write the report: page 1 is the executive summary (a red banner first where a ledger fails the
    integrity check), then the summary table, the comparison figures (each once) and one appendix per
    run. ``run_figures`` maps a run id to its (caption, PNG path) figures; ``summary_notes`` are lines
    shown under the comparison figures (e.g. figures left out)."""
    register_fonts()
    st = _styles()
    out = Path(out_pdf)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = SimpleDocTemplate(str(out), pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm,
                            topMargin=14 * mm, bottomMargin=16 * mm, title=title, author="privaudit",
                            initialFontName=FONT,  # else Helvetica (never embedded) is referenced
                            subject="privacy accounting and audit report")
    width = doc.width
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    acc = next((r.headline_accountant for r in records if r.headline_accountant), None)
    acc_text = (f"Every ε in the headlines and figures is from the {ACCOUNTANT_TITLES.get(acc, acc)} accountant "
                "(the tightest that covers every run); the appendices list all accountants."
                if acc else "ε: PLD where available, else PRV, else RDP (named beside each value).")
    story: list[Any] = [_p(title, st["title"]),
                        _p(f"Generated {now} from {len(records)} run director"
                           f"{'y' if len(records) == 1 else 'ies'}. {acc_text}", st["small"]),
                        Spacer(1, 4)]
    refused = [r for r in records if r.guarantee_refused and r.has_guarantee is not False]
    if refused:
        story += [_banner([f"LEDGER INTEGRITY FAILED: no privacy guarantee is stated for {r.label}: "
                           f"{r.guarantee_refused}." for r in refused], width, st), Spacer(1, 4)]
    story += [_p(SECTION_TITLES["executive"], st["h1"])]
    story += [_exec_block(r, records, width, st) for r in records]
    story += [Spacer(1, 4),
              _p("Verdicts: 'consistent' = a valid lower bound was computed, stays below the accounted ε, and the "
                 "audit could have certified that ε; 'inconclusive' = the audit could not test the accounted ε "
                 "(no bound, or too little power); 'violation' = the audit proves more leakage than the accounted "
                 "or claimed ε allows; 'no guarantee' = the run makes no formal claim.", st["caption"])]
    story += [CondPageBreak(50 * mm), _p(SECTION_TITLES["summary"], st["h1"]), _summary_table(records, width, st)]
    if summary_figures or summary_notes:
        story += [CondPageBreak(110 * mm), _p(SECTION_TITLES["comparison"], st["h1"])]
        for caption, path in summary_figures:
            story.append(KeepTogether([_image(path, width * 0.85, 86 * mm), _p(caption, st["caption"]),
                                       Spacer(1, 4)]))
        story += [_p(n, st["small"]) for n in summary_notes]
    shared = len(records) > 1 and all(r.versions == records[0].versions for r in records)
    for i, r in enumerate(records):
        story += _run_section(r, (run_figures or {}).get(r.run_id, ()), width, st, letter=_letter(i),
                              show_versions=not shared)
    if shared:
        story += [CondPageBreak(40 * mm), _p(f"Appendix {_letter(len(records))}: {SECTION_TITLES['versions']} "
                                             "(the same for every run)", st["h1"]),
                  *_versions_table(records[0].versions, width, st)]
    doc.build(story, canvasmaker=_NumberedCanvas)
    return out


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"A{i}"


__all__ = ["write_pdf", "register_fonts", "guarantee_note", "SECTION_TITLES"]
