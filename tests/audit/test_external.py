"""External audits: any checkpoint (HF folder, PEFT adapter) against member / non-member files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from privaudit.cli import main
from tests.audit.external_fixtures import _FIRST, _LAST, build_base, make_texts, train_lora_plain

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny untrained base (safetensors folder), a one-epoch adapter and small data files."""
    d = tmp_path_factory.mktemp("ext")
    base = build_base(d / "base", seed=0)
    texts = make_texts(40, 5)
    members, non = texts[:20], texts[20:]
    adapter = train_lora_plain(base, members, d / "adapter", epochs=1, rank=4)
    return {"dir": d, "base": base, "adapter": adapter,
            "members": _jsonl(d / "members.jsonl", [{"text": t} for t in members]),
            "non": _jsonl(d / "non.jsonl", [{"text": t} for t in non])}


def test_api_and_cli_write_audit_and_manifest(small: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit import audit_model
    from privaudit.reports.runs_table import load_run_record

    members = [json.loads(x)["text"] for x in small["members"].read_text().splitlines()]
    non = [json.loads(x)["text"] for x in small["non"].read_text().splitlines()]
    res = audit_model(str(small["base"]), None, members, non, adapter=small["adapter"], n_bootstrap=20)
    names = [a.name for a in res.attacks]
    assert names == ["loss", "zlib", "lowercase", "min_k", "min_k_pp", "ref"]
    assert res.verdict == "inconclusive" and "fair coins" in res.verdict_reason
    assert res.epsilon_lower["value"] is None and all(a.epsilon_lower is None for a in res.attacks)
    assert res.path is None  # nothing written without out_dir

    out = tmp_path / "out"
    rc, stdout, err = _cli(["audit", "--model", str(small["base"]), "--adapter", str(small["adapter"]),
                            "--members", str(small["members"]), "--non-members", str(small["non"]),
                            "-o", str(out), "--json", "--attacks", "loss,ref"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    assert [a["name"] for a in audit["attacks"]] == ["loss", "ref"]
    for a in audit["attacks"]:
        m = a["metrics"]
        assert 0 <= m["auc"] <= 1 and len(m["auc_ci"]) == 2 and "tpr_at_0.1%_fpr" in m and "tpr_at_1%_fpr" in m
        assert a["roc"]["fpr"][0] == 0.0
    # the API's loss AUC equals the CLI's (same scoring pass, same data)
    assert audit["attacks"][0]["metrics"]["auc"] == pytest.approx(res.attack("loss").metrics["auc"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["audited"]["model"]["adapter"]["sha256"]
    assert man["data"]["members"]["file_sha256"] and man["membership_decided_by"]["records"].startswith("the user's")
    rec = load_run_record(out)  # `privaudit report OUT_DIR` reads it like a run
    assert rec.verdict == "inconclusive" and rec.has_audit
    assert any("no empirical ε lower bound" in w for w in rec.warnings)


def test_coin_flip_gives_bound_and_claim_is_checked(small: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "o"
    rc, stdout, err = _cli(["audit", "--model", str(small["base"]), "--adapter", str(small["adapter"]),
                            "--members", str(small["members"]), "--non-members", str(small["non"]), "-o", str(out),
                            "--members-by-coin-flip", "--attacks", "loss", "--epsilon", "1", "--delta", "1e-5",
                            "--json"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    assert audit["attacks"][0]["epsilon_lower"]["method"].startswith("one_run")
    assert audit["epsilon_lower"]["value"] is not None
    assert audit["claimed"][0]["status"] in ("refuted", "not refuted")


@pytest.mark.parametrize("case", ["no_column", "empty", "overlap", "pickle", "mismatch", "missing_model",
                                  "unknown_attack", "no_output", "run_dir_and_model"])
def test_bad_input_one_line_exit_2_nothing_written(case: str, small: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model, adapter = str(small["base"]), str(small["adapter"])
    members, non = str(small["members"]), str(small["non"])
    extra: list[str] = []
    expect = ""
    if case == "no_column":
        extra, expect = ["--text-column", "body"], "column 'body' not found"
    elif case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        non, expect = str(tmp_path / "e.jsonl"), "non_members"
    elif case == "overlap":
        rows = [json.loads(x) for x in small["members"].read_text().splitlines()[:3]] + [{"text": "kofi park ."}]
        non, expect = str(_jsonl(tmp_path / "n.jsonl", rows)), "3 distinct texts"
    elif case == "pickle":
        d = tmp_path / "pk"
        d.mkdir()
        (d / "config.json").write_text((small["base"] / "config.json").read_text())
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        model, adapter, expect = str(d), None, "pytorch_model.bin is a pickle-based checkpoint"
    elif case == "mismatch":
        other = build_base(tmp_path / "other", seed=1)
        cfg = json.loads((other / "config.json").read_text())
        cfg["n_embd"] = 32
        (other / "config.json").write_text(json.dumps(cfg))
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).save_pretrained(
            str(other), safe_serialization=True)
        model, expect = str(other), "does not fit the base model"
    elif case == "missing_model":
        model, adapter, expect = "no-such-org/no-such-model", None, "neither a local directory nor in the local"
    elif case == "unknown_attack":
        extra, expect = ["--attacks", "loss,bogus"], "unknown attack 'bogus'"
    elif case == "no_output":
        out, expect = None, "-o/--output: required"  # type: ignore[assignment]
    elif case == "run_dir_and_model":
        extra, expect = [str(tmp_path)], "either a run directory"
    args = ["audit", "--quiet", "--model", model, "--members", members, "--non-members", non] + extra
    if adapter:
        args += ["--adapter", adapter]
    if out is not None:
        args += ["-o", str(out)]
    rc, stdout, err = _cli(args, capsys)
    assert rc == 2, (stdout, err)
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert out is None or not out.exists()


def test_member_options_without_model_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _cli(["audit", str(tmp_path), "--members", "m.jsonl"], capsys)
    assert rc == 2 and "need --model" in err


@pytest.mark.slow
def test_done_when_plain_peft_finetune_is_detected_and_base_is_not(tmp_path_factory: pytest.TempPathFactory,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18's acceptance test: a tiny causal LM pre-trained on public records, LoRA-fine-tuned with plain
    PEFT on 100 member records (+ coin-flip canaries); the CLI audit finds it, and finds nothing in the base."""
    d = tmp_path_factory.mktemp("done")
    texts = make_texts(400, 0)
    members, non, public = texts[0:200:2], texts[1:200:2], texts[200:]
    rng = random.Random(7)
    pairs = rng.sample([(f, surname) for f in _FIRST for surname in _LAST], 16)  # distinct prefixes
    canaries = [{"prefix": f"the pin of {f} {surname} is ", "secret": f"{rng.randint(0, 9999):04d}",
                 "included": rng.random() < 0.5, "format": "pin"} for f, surname in pairs]
    train = members + [c["prefix"] + c["secret"] for c in canaries if c["included"]]
    base = build_base(d / "base", seed=0, pretrain_texts=public, pretrain_epochs=5)
    adapter = train_lora_plain(base, train, d / "adapter", epochs=50, lr=5e-3, rank=16)
    mf, nf = _jsonl(d / "m.jsonl", [{"text": t} for t in members]), _jsonl(d / "n.jsonl", [{"text": t} for t in non])
    cf = _jsonl(d / "canaries.jsonl", canaries)

    rc, stdout, err = _cli(["audit", "--model", str(base), "--adapter", str(adapter), "--members", str(mf),
                            "--non-members", str(nf), "-o", str(d / "ft"), "--canaries", str(cf), "--json"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    by = {a["name"]: a for a in audit["attacks"]}
    assert by["ref"]["metrics"]["auc_ci"][0] > 0.8, by["ref"]["metrics"]
    assert by["loss"]["metrics"]["auc"] > 0.65
    assert {"canary_membership", "canary_exposure", "canary_extraction"} <= set(by)
    assert by["canary_membership"]["epsilon_lower"]["value"] > 0  # canaries: fair coins -> a bound
    assert by["loss"].get("epsilon_lower") is None  # the user's split: metrics only
    ext = by["canary_extraction"]["metrics"]
    assert ext["exact_secret_rate_greedy_excluded"] == 0.0  # a secret never trained on is not produced
    assert ext["exact_secret_rate_greedy_included"] >= ext["exact_secret_rate_greedy_excluded"]

    rc, stdout, err = _cli(["audit", "--model", str(base), "--members", str(mf), "--non-members", str(nf),
                            "-o", str(d / "base_audit"), "--json"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    assert audit["verdict"] == "inconclusive"
    for a in audit["attacks"]:
        lo, hi = a["metrics"]["auc_ci"]
        assert lo <= 0.5 <= hi, (a["name"], a["metrics"]["auc_ci"])


@pytest.mark.slow
def test_train_writes_peft_adapter_and_external_audit_reproduces_run_audit(tmp_path: Path) -> None:
    """`privaudit train` writes RUN_DIR/peft in PEFT's format; PeftModel.from_pretrained on the rebuilt base
    gives the released model, and the external audit of it reproduces the run-directory audit's loss AUC."""
    import copy

    import torch
    from peft import PeftModel

    from privaudit import audit_model
    from privaudit.audit.auditor import _population, audit_run
    from privaudit.config import parse_config
    from privaudit.mechanisms.training import prepare_data
    from privaudit.models import load_base_model
    from privaudit.runs import load_run, train

    raw = {"task": "causal_lm",
           "model": {"name": "tiny-gpt2", "max_length": 24, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
           "lora": {"rank": 4, "alpha": 8},
           "data": {"synthetic": {"n_people": 12, "records_per_person": 2, "n_canaries": 0}, "heldout_fraction": 0.5},
           "training": {"epochs": 4, "batch_size": 6, "learning_rate": 0.05},
           "privacy": {"noise_multiplier": 0.0, "noise_seed": 1}}
    cfg = parse_config(copy.deepcopy(raw))
    rd = tmp_path / "run"
    train(cfg, rd, progress=False)
    peft_dir = rd / "peft"
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()
    assert json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-gpt2"

    base, tok = load_base_model("tiny-gpt2", "causal_lm", seed=cfg.training.seed, **cfg.model.overrides)
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir), safe_serialization=True)
    tok.save_pretrained(str(base_dir))
    peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    released = load_run(rd).model
    ids = torch.tensor([tok("alice paid the invoice")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, released(input_ids=ids).logits)

    run_res = audit_run(rd, attacks=["loss"], n_bootstrap=0, _write=False)
    members, non, _, _ = _population(prepare_data(cfg), False, 1000, 0)
    ext = audit_model(str(base_dir), None, [r.text for r in members], [r.text for r in non], adapter=peft_dir,
                      attacks=["loss"], max_length=cfg.model.max_length, n_bootstrap=0)
    assert ext.attack("loss").metrics["auc"] == pytest.approx(run_res.attack("loss").metrics["auc"], abs=1e-9)


def test_loaded_peft_model_api_uses_its_base_as_reference(small: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from privaudit import audit_model

    base = AutoModelForCausalLM.from_pretrained(str(small["base"]), local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(small["base"]), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(small["adapter"]))
    members = [json.loads(x)["text"] for x in small["members"].read_text().splitlines()]
    non = [json.loads(x)["text"] for x in small["non"].read_text().splitlines()]
    res = audit_model(model, tok, members, non, attacks=["loss", "ref"], n_bootstrap=0)
    by_name = audit_model(str(small["base"]), None, members, non, adapter=small["adapter"], attacks=["loss", "ref"],
                          n_bootstrap=0)
    for name in ("loss", "ref"):
        assert res.attack(name).metrics["auc"] == pytest.approx(by_name.attack(name).metrics["auc"], abs=1e-9)
    with pytest.raises(ValueError, match="^tokenizer"):
        audit_model(model, None, members, non)


def test_sequence_classifier_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A classifier folder whose tokenizer has no pad token (eos is used), labels from a column."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from tests.audit.external_fixtures import build_tokenizer

    tok = build_tokenizer()
    tok.pad_token = None
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=3,
                     architectures=["GPT2ForSequenceClassification"])
    d = tmp_path / "clf"
    GPT2ForSequenceClassification(cfg).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    texts = make_texts(30, 9)
    mf = _jsonl(tmp_path / "m.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(texts[:15])])
    nf = _jsonl(tmp_path / "n.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(texts[15:])])
    rc, stdout, err = _cli(["audit", "--model", str(d), "--members", str(mf), "--non-members", str(nf),
                            "-o", str(tmp_path / "out"), "--label-column", "label", "--json"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    assert [a["name"] for a in audit["attacks"]] == ["loss", "confidence", "entropy", "modified_entropy"]
    assert all(0 <= a["metrics"]["auc"] <= 1 for a in audit["attacks"])
    rc, _, err = _cli(["audit", "--quiet", "--model", str(d), "--members", str(mf), "--non-members", str(nf),
                       "-o", str(tmp_path / "out2")], capsys)
    assert rc == 2 and "label" in err and not (tmp_path / "out2").exists()


def test_ledger_is_checked_and_copied_for_the_report(small: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from privaudit.ledger.opacus import ledger_from_opacus_history
    from privaudit.reports.runs_table import load_run_record

    lp = tmp_path / "ledger.jsonl"
    ledger_from_opacus_history([(1.0, 0.05, 200)], lp, target_delta=1e-5)
    out = tmp_path / "out"
    rc, stdout, err = _cli(["audit", "--model", str(small["base"]), "--adapter", str(small["adapter"]),
                            "--members", str(small["members"]), "--non-members", str(small["non"]), "-o", str(out),
                            "--ledger", str(lp), "--attacks", "loss", "--json"], capsys)
    assert rc == 0, err
    audit = json.loads(stdout)
    assert audit["accounted"]["delta"] == 1e-5 and audit["accounted"]["epsilon"]["rdp"] > 0
    assert audit["verdict"] == "inconclusive"  # a guarantee, but nothing here can test it
    assert (out / "ledger.jsonl").read_bytes() == lp.read_bytes()
    rec = load_run_record(out)
    assert rec.accountant("rdp").recomputed == pytest.approx(audit["accounted"]["epsilon"]["rdp"])
    rc, _, err = _cli(["audit", "--quiet", "--model", str(small["base"]), "--members", str(small["members"]),
                       "--non-members", str(small["non"]), "-o", str(tmp_path / "o2"), "--ledger", str(lp),
                       "--epsilon", "1"], capsys)
    assert rc == 2 and "not both" in err and not (tmp_path / "o2").exists()
