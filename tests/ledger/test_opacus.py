"""A ledger built from an Opacus accountant's history gives Opacus's own ε."""

from __future__ import annotations

from pathlib import Path

import pytest

from privaudit import compute_epsilon
from privaudit.ledger.opacus import ledger_from_opacus_history


def test_epsilon_equals_opacus_rdp(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for sigma, q, steps in ((1.1, 0.01, 300), (0.9, 0.02, 50), (1.1, 0.01, 120)):
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    ledger = ledger_from_opacus_history(acc.history, tmp_path / "ledger.jsonl", target_delta=1e-5,
                                        base_model="my-model", dataset_size=5000)
    ours = compute_epsilon(ledger, 1e-5, "rdp").epsilon
    assert ours == pytest.approx(acc.get_epsilon(1e-5), abs=1e-9)
    assert ledger.header.neighbouring == "add_remove" and ledger.header.observer == "released model"


@pytest.mark.parametrize("history, field", [([], "empty"), ([(0.0, 0.01, 3)], "noise_multiplier"),
                                            ([(1.0, 1.5, 3)], "sample_rate"), ([(1.0, 0.1, 0)], "num_steps")])
def test_bad_history(tmp_path: Path, history: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ledger_from_opacus_history(history, tmp_path / "l.jsonl", target_delta=1e-5)
    assert not (tmp_path / "l.jsonl").exists()
