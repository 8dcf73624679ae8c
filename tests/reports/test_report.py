"""End to end: run directories -> PDF (checked with poppler), PNG figures, CSV and JSON tables."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from privaudit.reports import ReportOutputs, build_report, format_epsilon
from privaudit.reports.pdf import SECTION_TITLES
from tests.reports.conftest import (
    DP_STRONG_EVENTS,
    DP_WEAK_EVENTS,
    MANIFEST_EPS,
    fake_epsilon,
    install_fake_accountants,
    make_four_runs,
    poppler_available,
    real_accountants_available,
    remove_accountants,
    requires_poppler,
    run_tool,
)

PER_RUN_SECTIONS = ("details", "verdict", "accountants", "attacks", "ledger", "guarantee")
HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _text(pdf: Path) -> str:
    return " ".join(run_tool("pdftotext", str(pdf), "-").split())


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ReportOutputs:
    """The four synthetic runs, accounted by the fake accountants (recomputation path)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        install_fake_accountants(mp)
        runs = make_four_runs(root / "runs")
        msgs: list[str] = []
        out = build_report(runs, root / "out" / "report.pdf", progress=msgs.append, steps_points=10)
    assert any("loading run 4/4" in m for m in msgs) and any(m.startswith("PDF") for m in msgs)
    return out


@requires_poppler
def test_pdf_sections_and_epsilons(report: ReportOutputs) -> None:
    text = _text(report.pdf)
    for key in ("executive", "summary", "comparison"):
        assert SECTION_TITLES[key] in text
    for key in PER_RUN_SECTIONS:
        assert text.count(SECTION_TITLES[key]) >= 4, key  # one per run appendix
    assert text.count(SECTION_TITLES["claims"]) == 1  # only the run with a claim
    assert text.count(SECTION_TITLES["versions"]) == 1  # the same for every run: one appendix
    for i, label in enumerate(("baseline", "dp-strong", "dp-weak", "sketch-claim")):
        assert f"Appendix {'ABCD'[i]}: {label}" in text
    by_label = {r.label: r for r in report.records}
    # recomputed ε (checked against the fake accountants' formula) appear as formatted
    for label, events in (("dp-strong", DP_STRONG_EVENTS), ("dp-weak", DP_WEAK_EVENTS)):
        r = by_label[label]
        for acc in ("rdp", "pld", "prv"):
            expected = fake_epsilon(events, acc)
            assert r.accountant(acc).recomputed == pytest.approx(expected)  # type: ignore[union-attr]
            assert format_epsilon(expected) in text, (label, acc)
            assert format_epsilon(MANIFEST_EPS[label][acc]) in text  # the manifest's value beside it
        assert f"{format_epsilon(fake_epsilon(events, 'pld'))} (PLD)" in text
    assert "∞ (no guarantee)" in text
    for label in ("baseline", "sketch-claim"):
        assert by_label[label].primary_epsilon[0] == math.inf
    # claimed vs empirical, verdicts
    assert "refuted by audit (ε_lower 2.400 > claimed)" in text
    for v in ("3.100", "0.120", "0.850", "2.400", "1.000"):
        assert v in text
    for label, verdict in (("baseline", "no guarantee"), ("dp-strong", "consistent"), ("dp-weak", "inconclusive"),
                           ("sketch-claim", "violation")):
        assert f"{label} [{verdict}]" in text
    # ledger head hash and library versions
    for r in report.records:
        assert r.ledger_head and r.ledger_head in text
    assert "prv-accountant" in text and "2.13.0" in text
    # plain-language note generated from the header
    assert "(ε, δ)-differential privacy with ε = " + format_epsilon(fake_epsilon(DP_WEAK_EVENTS, "pld")) in text
    assert "any single training record being added to or removed from the training data" in text
    assert "No formal guarantee: plaintext release" in text
    assert "Record level, not person level" in text
    assert re.search(r"page 1 of \d+", text)


@requires_poppler
def test_pdf_renders_fonts_embedded(report: ReportOutputs, tmp_path: Path) -> None:
    pages = int(re.search(r"Pages:\s+(\d+)", run_tool("pdfinfo", str(report.pdf))).group(1))  # type: ignore[union-attr]
    assert pages >= 5
    run_tool("pdftoppm", "-r", "50", "-png", str(report.pdf), str(tmp_path / "pg"))
    images = sorted(tmp_path.glob("pg-*.png"))
    assert len(images) == pages
    for img_path in images:
        img = imread(img_path)
        assert float(img[..., :3].std()) > 0.01, img_path.name  # every page has content
    first = imread(images[0])
    assert float(first[..., :3].std()) > 0.1  # tables and a figure, not a near-blank page
    fonts = run_tool("pdffonts", str(report.pdf)).splitlines()[2:]
    assert fonts
    names = [line.split()[0] for line in fonts]
    assert any("DejaVuSans" in n for n in names)
    for line in fonts:
        emb = re.search(r"\s(yes|no)\s+(yes|no)\s+(yes|no)\s+\d+\s+\d+\s*$", line)
        assert emb and emb.group(1) == "yes", line


def test_side_outputs(report: ReportOutputs) -> None:
    out_dir = report.pdf.parent
    assert report.runs_csv == out_dir / "report_runs.csv"
    assert report.runs_json == out_dir / "report_runs.json"
    fig_dir = out_dir / "report_figures"
    names = {p.name for p in fig_dir.glob("*.png")}
    assert {"eps_vs_utility.png", "attack_success_vs_eps.png", "empirical_vs_accounted.png",
            "eps_over_steps.png", "roc_dp-weak.png"} <= names
    assert not any(n.startswith("eps_over_steps_") for n in names)  # each figure once, not again per run
    for p in report.figures.values():
        assert p.stat().st_size > 5000 and imread(p).shape[0] > 200
    with open(report.runs_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["baseline", "dp-strong", "dp-weak", "sketch-claim"]
    assert rows[0]["epsilon"] == "inf" and rows[3]["verdict"] == "violation"
    assert float(rows[2]["epsilon_pld"]) == pytest.approx(fake_epsilon(DP_WEAK_EVENTS, "pld"))
    with open(report.attacks_csv, newline="") as fh:
        attacks = list(csv.DictReader(fh))
    assert len(attacks) == 6 and {"auc", "auc_ci_low", "auc_ci_high", "tpr_at_0.1%_fpr"} <= set(attacks[0])
    data = json.loads(report.runs_json.read_text())
    assert len(data["runs"]) == 4
    weak = data["runs"][2]
    assert weak["epsilon_over_steps"]["accountant"] == "pld" and len(weak["epsilon_over_steps"]["steps"]) == 10
    assert [a["accountant"] for a in weak["accountants"]] == ["rdp", "pld", "prv"]
    assert data["runs"][3]["claims"][0]["status"].startswith("refuted")


@requires_poppler
def test_without_accountants_says_not_available(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        remove_accountants(mp)
        runs = make_four_runs(tmp_path / "runs")
        out = build_report(runs[1:3], tmp_path / "r.pdf", steps_points=5)
    text = _text(out.pdf)
    assert "not available: accountant not installed" in text
    for label in ("dp-strong", "dp-weak"):
        for acc in ("rdp", "pld", "prv"):
            assert format_epsilon(MANIFEST_EPS[label][acc]) in text
    assert "ε over training steps: not shown" in text
    assert not (tmp_path / "r_figures" / "eps_over_steps_dp-weak.png").exists()


@requires_poppler
def test_single_run_has_title_block(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        remove_accountants(mp)
        runs = make_four_runs(tmp_path / "runs")
    out = build_report([runs[3]], tmp_path / "one.pdf", steps_points=0)
    text = _text(out.pdf)
    for field in ("model", "data fingerprint", "mechanism", "privacy unit", "neighbouring relation", "δ",
                  "observer"):
        assert field in text
    assert "sha256:abab" in text and "lora_sketch" in text and "released model" in text


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^run_dir: .*missing"):
        build_report([tmp_path / "missing"], tmp_path / "x.pdf")
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(ValueError, match=r"^run_dir: .*nomanifest"):
        build_report([tmp_path / "nomanifest"], tmp_path / "x.pdf")
    with pytest.raises(ValueError, match=r"^run_dirs: "):
        build_report([], tmp_path / "x.pdf")
    with pytest.raises(ValueError, match=r"^out_pdf: "):
        build_report([tmp_path / "nomanifest"], tmp_path / "x.txt")
    assert not (tmp_path / "x.pdf").exists()


@pytest.mark.skipif(not real_accountants_available(), reason="accountant modules not in this checkout yet")
def test_real_accountants_recompute(tmp_path: Path) -> None:
    from privaudit import compute_epsilon

    runs = make_four_runs(tmp_path / "runs", use_accountants=True)
    out = build_report(runs[1:3], tmp_path / "real.pdf", steps_points=4)
    text = _text(out.pdf) if poppler_available() else ""
    for r, events in zip(out.records, (DP_STRONG_EVENTS, DP_WEAK_EVENTS)):
        for acc in ("rdp", "pld", "prv"):
            expected = compute_epsilon(events, 1e-5, accountant=acc).epsilon
            a = r.accountant(acc)
            assert a is not None and a.recomputed == pytest.approx(expected) and not a.mismatch
            if text:
                assert format_epsilon(expected) in text
        # the curve is in the report's headline accountant and ends at the headline ε
        assert r.eps_over_steps_accountant == r.headline_accountant == "pld"
        assert r.eps_over_steps[-1][1] == pytest.approx(r.accountant("pld").recomputed)  # type: ignore[union-attr]


def _page_text(pdf: Path, page: int) -> str:
    return " ".join(run_tool("pdftotext", "-f", str(page), "-l", str(page), str(pdf), "-").split())


@requires_poppler
def test_page_one_is_a_plain_language_summary(report: ReportOutputs) -> None:
    page1 = _page_text(report.pdf, 1)
    assert "Executive summary" in page1
    for q in ("what was trained", "guarantee", "utility cost", "strongest attack", "empirical lower bound",
              "verdict", "ledger integrity"):
        assert page1.count(q) >= 4, q  # once per run
    weak_eps = format_epsilon(fake_epsilon(DP_WEAK_EVENTS, "pld"))
    assert f"(ε = {weak_eps}, δ = 1e-05)-differential privacy (PLD accountant)" in page1
    assert "accuracy 0.880 against 0.910 without privacy (baseline)" in page1
    assert "rmia: AUC 0.610 (95% CI 0.580 to 0.640)" in page1 and "3.0% of members" in page1
    assert "the most this audit's design could certify is 1.560" in page1
    assert "INCONCLUSIVE: the accounted ε = " + weak_eps in page1
    assert "no formal guarantee: plaintext release" in page1
    assert page1.count("verified: the hash chain verifies") == 4
    assert "LEDGER INTEGRITY FAILED" not in page1
    assert not HEX_ID.search(page1), HEX_ID.search(page1)


@requires_poppler
def test_visual_check_pages_figures_and_no_raw_dumps(report: ReportOutputs, tmp_path: Path) -> None:
    """Render the pages: a bounded page count, every figure distinct, no raw dict dumps anywhere."""
    import hashlib

    pages = int(re.search(r"Pages:\s+(\d+)", run_tool("pdfinfo", str(report.pdf))).group(1))  # type: ignore[union-attr]
    assert 4 <= pages <= 10, pages  # 4 runs: page 1, tables and figures that fill pages, appendices
    run_tool("pdftoppm", "-r", "40", "-png", str(report.pdf), str(tmp_path / "pg"))
    assert len(list(tmp_path.glob("pg-*.png"))) == pages
    digests = {name: hashlib.sha256(imread(p).tobytes()).hexdigest() for name, p in report.figures.items()}
    assert len(set(digests.values())) == len(digests), digests  # no figure twice
    listed = [ln.split() for ln in run_tool("pdfimages", "-list", str(report.pdf)).splitlines()[2:]]
    images = [x for x in listed if x[2] == "image"]  # (each PNG's alpha channel is listed as an "smask")
    assert len(images) == len(report.figures)  # each figure in the PDF exactly once
    text = _text(report.pdf)
    assert "{'" not in text and "{\"" not in text


@requires_poppler
def test_dict_metrics_are_summarised_not_dumped(tmp_path: Path) -> None:
    from tests.reports.conftest import DELTA, make_run
    from privaudit.ledger.events import GaussianEvent

    exposures = {f"canary-{i:03d}": 1.234567891 * i for i in range(200)}
    audit = {"accounted": {"delta": DELTA, "epsilon": {}}, "claimed": [],
             "attacks": [{"name": "canary_exposure", "kind": "canary",
                          "metrics": {"auc": 0.6123456789, "auc_ci": [0.5, 0.7], "exposures": exposures,
                                      "exposure_max": 7.123456789, "candidates_per_canary": 1000}}],
             "epsilon_lower": {"value": 0.0, "method": "none"}, "verdict": "inconclusive"}
    with pytest.MonkeyPatch.context() as mp:
        install_fake_accountants(mp)
        d = make_run(tmp_path, "exposure", mechanism="dp_lora", noise=1.0, q=0.01, audit=audit,
                     events=[GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, count=10)],
                     eps_fallback={"rdp": 0.2, "pld": 0.1, "prv": 0.1})
        out = build_report([d], tmp_path / "one.pdf", steps_points=0)
    text = _text(out.pdf)
    assert "canary-001" not in text and "{'" not in text and "1.234567891" not in text
    assert "exposure max 7.123" in text and "(+1 more in the attacks CSV)" in text
    assert "0.612" in text and "0.6123456789" not in text
    assert "INCONCLUSIVE: no attack had the power to produce an ε lower bound" in text
