"""Trainable new-token canary rows (audit.lm_canary_train_new_tokens, privaudit.mechanisms.new_token_rows):
exact per-sample clipping, data-independent θ₀, saved/restored with the run, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from privaudit.config import parse_config
from privaudit.mechanisms.per_sample import PerSampleGradients, clip_factors
from privaudit.mechanisms.training import build_model, encode, per_sample_losses, prepare_data

CPU = torch.device("cpu")
GPT2 = {"name": "tiny-gpt2", "max_length": 16, "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}}
LLAMA = {"name": "tiny-llama", "max_length": 16,  # ties its input and output embeddings
         "overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 2, "num_key_value_heads": 1}}
BASE: dict[str, Any] = {
    "task": "causal_lm",
    "model": GPT2,
    "lora": {"rank": 2, "alpha": 4, "target_modules": ["c_attn", "lm_head"]},
    "data": {"synthetic": {"n_people": 4, "records_per_person": 1, "n_canaries": 12}, "heldout_fraction": 0.5},
    "training": {"steps": 1, "batch_size": 4},
    "privacy": {"noise_multiplier": 0.0},
    "audit": {"lm_canary_design": "new_token", "lm_canary_secret_tokens": 2, "lm_canary_train_new_tokens": True},
}
ROWS = ("new_rows.weight",)


def cfg_with(**sections: Any) -> Any:
    raw = copy.deepcopy(BASE)
    for k, v in sections.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    if "epochs" in raw["training"]:
        raw["training"].pop("steps")
    return parse_config(raw)


def new_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(ROWS)}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model", [GPT2, LLAMA], ids=["gpt2-lora-on-lm_head", "llama-tied"])
def test_per_sample_norms_and_clipped_sums_of_the_rows_are_exact(model: dict[str, Any]) -> None:
    lora = {"rank": 2, "alpha": 4} if model is LLAMA else BASE["lora"]
    cfg = cfg_with(model=model, lora=lora)
    net, tok = build_model(cfg, 2, CPU)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    rows = [n for n in names if n.endswith(ROWS)]
    assert len(rows) == 2 and any(".lm_head." in n for n in rows)  # input and output rows, untied
    data = prepare_data(cfg)
    recs = [r for r in data.train if r.canary_id is not None][:3] + [r for r in data.train if r.canary_id is None][:2]
    batch = encode(tok, recs, cfg, CPU)
    psg = PerSampleGradients(net, "auto")
    per_sample_losses(net, batch, "causal_lm").sum().backward()
    norms = psg.sq_norms().sqrt()
    clip = 0.5 * float(norms.median())
    got = psg.weighted_sum(clip_factors(norms, clip))
    psg.remove()
    net.zero_grad(set_to_none=True)
    params = [p for n, p in net.named_parameters() if p.requires_grad]
    brute = []
    for i in range(len(recs)):  # per-example autograd, one record at a time
        one = {k: v[i:i + 1] for k, v in batch.items()}
        brute.append(torch.autograd.grad(per_sample_losses(net, one, "causal_lm").sum(), params))
    bnorm = torch.stack([torch.sqrt(sum(g.double().square().sum() for g in gs)) for gs in brute])
    torch.testing.assert_close(norms.double(), bnorm, rtol=1e-5, atol=1e-7)
    factors = clip_factors(bnorm, clip)
    for j, n in enumerate(names):
        want = sum(float(factors[i]) * brute[i][j].double() for i in range(len(recs)))
        torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-7)
    for n in rows:  # the canaries' records reach their rows; the others' only through the output layer
        j = names.index(n)
        assert all(brute[i][j].abs().sum() > 0 for i in range(3))
        if ".lm_head." not in n:
            assert all(brute[i][j].abs().sum() == 0 for i in range(3, 5))


def test_theta0_is_public_rebuildable_and_the_frozen_designs_function() -> None:
    cfg = cfg_with()
    a, tok = build_model(cfg, 2, CPU)
    b, _ = build_model(cfg, 2, CPU)
    ra, rb = new_rows(trainable(a)), new_rows(trainable(b))
    assert len(ra) == 2 and all(torch.equal(ra[k], rb[k]) for k in ra)
    # other data (people, corpus seed, canary seed), same model and token count: the same θ₀ rows
    other = cfg_with(data={"synthetic": {"n_people": 7, "records_per_person": 2, "n_canaries": 12, "seed": 5}},
                     audit={**BASE["audit"], "lm_canary_seed": 99})
    rc = new_rows(trainable(build_model(other, 2, CPU)[0]))
    assert all(torch.equal(ra[k], rc[k]) for k in ra)
    assert all(v.norm() > 0 for v in ra.values())
    # at θ₀ the model computes what the frozen design computes (the rows start where add_new_tokens put them)
    frozen, _ = build_model(cfg_with(audit={**BASE["audit"], "lm_canary_train_new_tokens": False}), 2, CPU)
    assert not new_rows(trainable(frozen))
    canary = prepare_data(cfg).corpus.canaries[0]
    ids = torch.tensor([tok(canary.text)["input_ids"]])
    assert max(ids[0]) >= tok.vocab_size  # the text holds new tokens
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, frozen(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_dp_run_trains_saves_and_restores_the_rows(tmp_path: Path) -> None:
    from privaudit.attacks.released_model import _initial_model
    from privaudit.runs import load_run, train

    cfg = cfg_with(training={"steps": 6, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 0.05},
                   privacy={"noise_multiplier": 1.0, "noise_seed": 3})
    straight = train(cfg, tmp_path / "straight", progress=False).run_dir
    init, final = load_file(str(straight / "adapter_init.safetensors")), load_file(str(straight / "adapter.safetensors"))
    assert init.keys() == final.keys() and len(new_rows(final)) == 2
    assert all(not torch.equal(init[k], final[k]) for k in new_rows(final))  # noise and gradients moved them
    man = json.loads((straight / "manifest.json").read_text())
    assert man["peft_export"].startswith("not written: trainable parameter") and ".new_rows." in man["peft_export"]
    assert not (straight / "peft").exists()
    # crash after step 3, resume from the step-2 checkpoint: the same release as the straight run
    class Crash(Exception):
        pass

    def crash(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "crashed", progress=crash)
    resumed = train(cfg, tmp_path / "crashed", resume=True, progress=False).run_dir
    again = load_file(str(resumed / "adapter.safetensors"))
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    # the audit's loader rebuilds the module structure and loads the rows: released and θ₀ models
    run = load_run(straight)
    got = trainable(run.model)
    assert all(torch.equal(got[k], final[k]) for k in new_rows(final))
    got0 = trainable(_initial_model(run))
    assert all(torch.equal(got0[k], init[k]) for k in new_rows(init))


def test_refusals_name_the_field() -> None:
    for audit, extra in [({"lm_canary_design": "rare_token"}, {}), ({"lm_canary_design": "format"}, {}),
                         ({"lm_canary_design": "new_token"}, {"mechanism": "lora_sketch"}),
                         ({"lm_canary_design": "new_token"}, {"mechanism": "he_lora"})]:
        raw = copy.deepcopy(BASE)
        raw["audit"] = {**audit, "lm_canary_train_new_tokens": True}
        raw.update(extra)
        with pytest.raises(ValueError, match="^audit.lm_canary_train_new_tokens"):
            parse_config(raw)
    raw = copy.deepcopy(BASE)
    raw["task"] = "classification"
    raw["audit"] = {"lm_canary_train_new_tokens": True}
    with pytest.raises(ValueError, match="^audit.lm_canary_train_new_tokens"):
        parse_config(raw)


@pytest.mark.slow
def test_a_non_private_run_with_trainable_rows_separates_members(tmp_path: Path) -> None:
    """σ = 0, 24 new-token canaries, no repeats: the secret-only loss under the trained rows separates
    members from non-members (AUC ≥ 0.9)."""
    from privaudit.audit.auditor import audit_run
    from privaudit.runs import train

    cfg = cfg_with(data={"synthetic": {"n_people": 4, "records_per_person": 1, "n_canaries": 24}},
                   training={"epochs": 10, "batch_size": 8, "learning_rate": 0.05, "optimizer": "adam"},
                   privacy={"noise_multiplier": 0.0, "noise_seed": 1})
    rd = train(cfg, tmp_path / "run", progress=False).run_dir
    att = audit_run(rd, attacks=["lm_canary_membership"], n_bootstrap=50).attack("lm_canary_membership")
    assert att.metrics["auc"] >= 0.9
    assert att.metrics["secret_nll_mean_included"] < att.metrics["secret_nll_mean_excluded"]
    # without noise a non-member's input rows get no gradient at all (its tokens are in no record); a member's move
    init, final = load_file(str(rd / "adapter_init.safetensors")), load_file(str(rd / "adapter.safetensors"))
    name = next(k for k in final if k.endswith(ROWS) and ".lm_head." not in k)
    first = prepare_data(cfg).corpus.canaries[0].fields["secret_token_ids"]
    moved = (final[name] - init[name]).abs().sum(dim=0)  # per new token (columns of the (d, k) weight)
    first_id = int(first.split()[0])
    for c in prepare_data(cfg).corpus.canaries:
        cols = [int(i) - first_id for i in c.fields["secret_token_ids"].split()]
        assert bool((moved[cols] > 0).all()) if c.included else bool((moved[cols] == 0).all())


def test_the_study_names_trained_rows_as_a_design() -> None:
    from privaudit.studies.lm_canaries import run_config, load_study

    base = copy.deepcopy(BASE)
    del base["audit"]["lm_canary_train_new_tokens"]
    study = load_study({"study": "lm_canaries", "base": base, "designs": ["new_token", "new_token_trained", "bigram"],
                        "privacy": [{"noise_multiplier": 0}]})
    got = {d: parse_config(run_config(study, d, study.privacy[0])).audit for d in study.designs}
    assert [(a.lm_canary_design, a.lm_canary_train_new_tokens) for a in got.values()] == [
        ("new_token", False), ("new_token", True), ("bigram", False)]
