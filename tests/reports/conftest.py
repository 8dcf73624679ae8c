"""Synthetic run directories written with the real Ledger API (see DESIGN.md "Runs and checkpoints")."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

import pytest

from privaudit.accounting import base
from privaudit.accounting.base import Accountant, EpsilonResult, Segment
from privaudit.ledger.events import ClaimEvent, GaussianEvent, PlaintextEvent, SketchEvent
from privaudit.ledger.ledger import Ledger

DELTA = 1e-5
VERSIONS = {"privaudit": "0.1.0", "torch": "2.13.0", "opacus": "1.6.0", "dp-accounting": "0.6.0",
            "prv-accountant": "0.2.0", "transformers": "5.0.0", "peft": "0.17.0"}


def poppler_available() -> bool:
    return all(shutil.which(t) for t in ("pdftotext", "pdftoppm", "pdffonts", "pdfinfo"))


requires_poppler = pytest.mark.skipif(not poppler_available(),
                                      reason="poppler-utils (pdftotext, pdftoppm, pdffonts) not installed")


def run_tool(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=60).stdout


def manifest_epsilons(events: Sequence[Any], fallback: dict[str, float | None], use_accountants: bool
                      ) -> dict[str, float | None]:
    """What the manifest records: the accountants' ε (if asked and installed), else the stand-ins."""
    out: dict[str, float | None] = dict(fallback)
    if use_accountants:
        from privaudit.accounting.base import compute_epsilon

        for name in fallback:
            eps = compute_epsilon(list(events), DELTA, accountant=name).epsilon
            out[name] = None if math.isinf(eps) else eps
    return out


class _FakeAccountant(Accountant):
    """ε = factor · Σ count·q/σ: simple, monotone in steps, and easy to check by hand."""

    factor = 1.0

    def _epsilon(self, segments: Sequence[Segment], delta: float) -> EpsilonResult:
        eps = self.factor * sum(s.count * s.sample_rate / s.noise for s in segments)
        return EpsilonResult(eps, None, None, self.name, delta)

    def _delta(self, segments: Sequence[Segment], epsilon: float) -> float:  # pragma: no cover
        return 0.0


FAKE_FACTORS = {"rdp": 1.1, "pld": 1.0, "prv": 1.02}


def fake_epsilon(events: Sequence[Any], accountant: str) -> float:
    """The fake accountants' ε, computed from the events directly (add/remove, Poisson)."""
    return FAKE_FACTORS[accountant] * sum(e.count * e.sample_rate / e.noise_multiplier
                                          for e in events if isinstance(e, GaussianEvent))


def install_fake_accountants(mp: pytest.MonkeyPatch) -> None:
    for name, factor in FAKE_FACTORS.items():
        cls = type(f"Fake{name.upper()}", (_FakeAccountant,), {"factor": factor, "name": name})
        mp.setitem(base._REGISTRY, name, cls)
    mp.setattr(base, "_load_builtin", lambda: None)


def remove_accountants(mp: pytest.MonkeyPatch) -> None:
    """Simulate a checkout where the accountant modules do not exist yet."""

    def missing() -> None:
        raise ModuleNotFoundError("No module named 'privaudit.accounting.rdp'",
                                  name="privaudit.accounting.rdp")

    mp.setattr(base, "_load_builtin", missing)


def real_accountants_available() -> bool:
    try:
        base._load_builtin()
    except ImportError:
        return False
    return True


def make_run(root: Path, name: str, *, mechanism: str, events: Sequence[Any],
             eps_fallback: dict[str, float | None] | None = None, claims: Sequence[ClaimEvent] = (),
             use_accountants: bool = False,
             utility: tuple[str, float] = ("accuracy", 0.8), task: str = "classification",
             audit: dict[str, Any] | None = None, privacy: bool = True,
             noise: float | None = None, q: float | None = None, observer: str = "released model",
             ) -> Path:
    d = root / name
    d.mkdir(parents=True)
    with Ledger.create(d / "ledger.jsonl", mechanism=mechanism, base_model="bundled/all-MiniLM-L6-v2",
                       dataset_fingerprint="sha256:" + "ab" * 16, dataset_size=1000, privacy_unit="record",
                       neighbouring="add_remove", target_delta=DELTA, observer=observer,
                       claims=list(claims)) as led:
        led.extend(events)
        seal = led.seal()  # a finished run seals its ledger; the manifest keeps the seal and head
        head, run_id = led.head_hash, led.header.run_id
    steps = sum(e.count for e in events if isinstance(e, GaussianEvent)) or None
    manifest: dict[str, Any] = {
        "format_version": 1, "run_id": run_id, "name": name, "mechanism": mechanism,
        "base_model": "bundled/all-MiniLM-L6-v2", "task": task,
        "dataset": {"fingerprint": "sha256:" + "ab" * 16, "size": 1000, "source": "synthetic faker corpus"},
        "config": {"lr": 1e-3},
        "metrics": {"utility": {"name": utility[0], "value": utility[1], "split": "heldout"},
                    "train_loss": 0.42, "steps": steps or 100},
        "versions": VERSIONS, "ledger_head_hash": head, "ledger_seal": seal, "created": "2025-01-01T00:00:00+00:00",
        "status": "complete",
    }
    if privacy:
        manifest["privacy"] = {"noise_multiplier": noise, "sample_rate": q, "steps": steps, "delta": DELTA,
                               "epsilon": manifest_epsilons(events, eps_fallback or {}, use_accountants)}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if audit is not None:
        audit = {"run_id": run_id, "observer": observer, **audit}
        (d / "audit.json").write_text(json.dumps(audit, indent=1))
    return d


def _attack(name: str, auc: float, ci: tuple[float, float], tpr01: float, tpr1: float,
            roc: bool = False, eps_lower: float | None = None) -> dict[str, Any]:
    a: dict[str, Any] = {"name": name, "kind": "membership",
                         "metrics": {"auc": auc, "auc_ci": list(ci), "tpr_at_0.1%_fpr": tpr01,
                                     "tpr_at_1%_fpr": tpr1}}
    if roc:
        fpr = [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
        a["roc"] = {"fpr": fpr, "tpr": [min(1.0, f ** (1 - (auc - 0.5)) + (0.001 if f else 0)) for f in fpr]}
    if eps_lower is not None:
        a["epsilon_lower"] = {"value": eps_lower, "confidence": 0.95, "method": "clopper_pearson"}
    return a


DP_STRONG_EVENTS = [GaussianEvent(noise_multiplier=1.3, sample_rate=0.02, clip_norm=1.0, count=100),
                    GaussianEvent(noise_multiplier=1.1, sample_rate=0.02, clip_norm=1.0, count=200)]
DP_WEAK_EVENTS = [GaussianEvent(noise_multiplier=0.6, sample_rate=0.02, clip_norm=1.0, count=300)]
MANIFEST_EPS = {"dp-strong": {"rdp": 1.912, "pld": 1.704, "prv": 1.711},
                "dp-weak": {"rdp": 9.871, "pld": 8.402, "prv": 8.415}}


def make_four_runs(root: Path, use_accountants: bool = False) -> list[Path]:
    """A non-private baseline, two DP runs with different ε, and a sketching run whose claim is violated.

    The manifests record the stand-in ε values below unless ``use_accountants`` (then the real ones).
    """
    baseline = make_run(
        root, "baseline", mechanism="full_finetune", privacy=False, utility=("accuracy", 0.91),
        events=[PlaintextEvent(what="model trained without noise", count=1)],
        audit={"accounted": {"delta": DELTA, "epsilon": {}}, "claimed": [],
               "attacks": [_attack("loss", 0.78, (0.74, 0.82), 0.02, 0.09, roc=True),
                           _attack("lira", 0.85, (0.81, 0.88), 0.08, 0.21, roc=True, eps_lower=3.1)],
               "epsilon_lower": {"value": 3.1, "confidence": 0.95, "method": "clopper_pearson",
                                 "attack": "lira"},
               "verdict": "no guarantee", "created": "2025-01-01T01:00:00+00:00"})
    dp_strong = make_run(
        root, "dp-strong", mechanism="dp_lora", noise=1.1, q=0.02, utility=("accuracy", 0.84),
        events=DP_STRONG_EVENTS,
        eps_fallback=dict(MANIFEST_EPS["dp-strong"]), use_accountants=use_accountants,
        audit={"accounted": {"delta": DELTA, "epsilon": {"pld": 1.704}}, "claimed": [],
               "attacks": [_attack("loss", 0.52, (0.49, 0.55), 0.001, 0.011, eps_lower=0.12)],
               "epsilon_lower": {"value": 0.12, "confidence": 0.95, "method": "clopper_pearson",
                                 "attack": "loss", "power": 12.0, "power_attack": "loss"},
               "verdict": "consistent", "created": "2025-01-01T01:00:00+00:00"})
    dp_weak = make_run(
        root, "dp-weak", mechanism="dp_lora", noise=0.6, q=0.02, utility=("accuracy", 0.88),
        events=DP_WEAK_EVENTS,
        eps_fallback=dict(MANIFEST_EPS["dp-weak"]), use_accountants=use_accountants,
        audit={"accounted": {"delta": DELTA, "epsilon": {"pld": 8.402}}, "claimed": [],
               "attacks": [_attack("loss", 0.58, (0.55, 0.61), 0.004, 0.02, roc=True),
                           _attack("rmia", 0.61, (0.58, 0.64), 0.006, 0.03, roc=True, eps_lower=0.85)],
               "epsilon_lower": {"value": 0.85, "confidence": 0.95, "method": "clopper_pearson",
                                 "attack": "rmia", "power": 1.56, "power_attack": "rmia"},
               "verdict": "inconclusive", "created": "2025-01-01T01:00:00+00:00"})
    claim = ClaimEvent(epsilon=1.0, delta=DELTA, scope="per run", source="sketching paper")
    sketch = make_run(
        root, "sketch-claim", mechanism="lora_sketch", utility=("perplexity", 23.5), task="causal_lm",
        events=[SketchEvent(rank=8, batch_size=32, steps=300, a_distribution="gaussian", a_secret=True)],
        claims=[claim], eps_fallback={"rdp": None, "pld": None, "prv": None}, use_accountants=use_accountants,
        audit={"accounted": {"delta": DELTA, "epsilon": {}},
               "claimed": [{"epsilon": 1.0, "delta": DELTA, "source": "sketching paper", "scope": "per run"}],
               "attacks": [_attack("canary_exposure", 0.83, (0.79, 0.87), 0.05, 0.15, eps_lower=2.4)],
               "epsilon_lower": {"value": 2.4, "confidence": 0.95, "method": "one_run",
                                 "attack": "canary_exposure"},
               "verdict": "violation", "created": "2025-01-01T01:00:00+00:00"})
    return [baseline, dp_strong, dp_weak, sketch]


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_four_runs(tmp_path_factory.mktemp("runs"))
