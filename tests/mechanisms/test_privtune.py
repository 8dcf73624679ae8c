"""PrivTune: the split, the training loop and its ledger, the server's view, configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privaudit.attacks.inversion import AuxData, attack_representations
from privaudit.ledger.events import DchiEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger
from privaudit.config import parse_config
from privaudit.data import generate_corpus
from privaudit.config import register_mechanism
from privaudit.mechanisms import rng
from privaudit.mechanisms.privtune.dchi import build_geometry, scale_floor
from privaudit.mechanisms.training import encode

register_mechanism("privtune", "privaudit.mechanisms.privtune.mechanism")

from privaudit.mechanisms.privtune import mechanism as pt  # noqa: E402
from privaudit.attacks.views import privtune as privtune_view
from privaudit.mechanisms import split_model as split_model
from privaudit.studies import privtune as privtune_study


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CORPUS = generate_corpus(n_people=40, records_per_person=2, n_canaries=0, seed=3)
TRAIN, HELDOUT = CORPUS.split(0.25, seed=0)


def _cfg(model: str = "tiny-llama", task: str = "classification", steps: int = 3, seed: int | None = 7, **options):
    return parse_config({
        "mechanism": "privtune", "task": task, "model": {"name": model, "max_length": 24},
        "training": {"steps": steps, "batch_size": 6, "sampling": "fixed_batch", "learning_rate": 0.01},
        "privacy": {"noise_multiplier": 0, **({"noise_seed": seed} if seed is not None else {})},
        "options": {"split_layer": 1, "eta": 0.5, "knn_k": 5, **options},
    })


def _small_geometry(split: split_model.SplitModel, settings: pt.PrivTuneSettings, records=CORPUS.records):
    """The vocabulary restricted to the corpus' tokens (the full 30k vocabulary is slow on CPU)."""
    tok = split.tokenizer
    ids = sorted({i for r in records for i in tok(r.text)["input_ids"]} - set(tok.all_special_ids))
    ids_t = torch.tensor(ids)
    reps = split_model.vocabulary_representations(split, ids_t)
    return build_geometry(ids_t, reps, split.model.get_input_embeddings().weight.shape[0], knn_k=settings.knn_k,
                          hops=settings.hops)


def _split(cfg):
    settings = pt.settings_of(cfg)
    split = pt.build_split_model(cfg, settings, 2, torch.device("cpu"))
    return split, settings


def test_bottom_is_the_input_of_block_k_and_mode_none_is_the_plain_model() -> None:
    cfg = _cfg(mode="none")
    split, settings = _split(cfg)
    batch = encode(split.tokenizer, TRAIN[:4], cfg, torch.device("cpu"))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = split.model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(split.bottom(batch), out.hidden_states[1])
    geo = _small_geometry(split, settings)
    noiser = pt.make_noiser(split, geo, settings)
    split.release_fn = lambda h, i, m: noiser.release(h, i, m).values
    split.mode = "release"
    with torch.no_grad():
        released = split.model(**inputs).logits
    torch.testing.assert_close(released, out.logits)
    # the bottom's parameters are frozen, the top's LoRA factors are not
    frozen = {id(p) for p in split.bottom_parameters()}
    trainable = [n for n, p in split.model.named_parameters() if p.requires_grad]
    assert trainable and all(id(p) not in frozen for p in split.model.parameters() if p.requires_grad)
    assert not any(".layers.0." in n for n in trainable)


def test_fit_writes_the_ledger_ahead_and_keeps_the_bottom_frozen(tmp_path) -> None:
    cfg = _cfg(steps=3)
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    before = {n: p.detach().clone() for n, p in split.model.named_parameters()}
    ledger = Ledger.create(tmp_path / "ledger.jsonl", mechanism="privtune", observer=pt.OBSERVER,
                           **pt.ledger_header_extra(cfg))
    seen: list[int] = []

    # the first top block checks that every token it receives is already in the ledger
    real_build = pt.build_split_model

    def build_and_watch(*args, **kwargs):
        s = real_build(*args, **kwargs)

        def watch(module, inputs):
            seen.append(sum(e.count for e in ledger.events if isinstance(e, DchiEvent)))
            seen.append(int((inputs[0].abs().sum(-1) > 0).sum()))
        s.blocks[s.k].register_forward_pre_hook(watch)
        return s

    pt.build_split_model = build_and_watch
    try:
        res = pt.fit(cfg, TRAIN, HELDOUT, ledger=ledger, num_labels=2, geometry=geo)
    finally:
        pt.build_split_model = real_build
    ledger.close()
    events = Ledger.read(tmp_path / "ledger.jsonl").events
    assert isinstance(events[0], PlaintextEvent) and "labels" in events[0].what and events[0].count == 18
    dchi = [e for e in events if isinstance(e, DchiEvent)]
    assert dchi and all(e.shifted_mean and e.dimension == 64 for e in dchi)
    assert sum(e.count for e in dchi) == res.metrics["token_releases"]
    assert all(e.eta >= res.noiser.eta for e in dchi)  # eta / scale floor; scales have mean 1, so floor <= 1
    # write-ahead: during training, the ledger already covered every token the top had received
    train_checks = list(zip(seen[0::2], seen[1::2]))[:3]  # the 3 training steps (evaluation follows)
    assert len(train_checks) == 3
    running = 0
    for ledgered, received in train_checks:
        running += received
        assert ledgered >= running
    # bottom frozen, top trained
    after = dict(res.model.named_parameters())
    for p in res.split.bottom_parameters():
        name = next(n for n, q in after.items() if q is p)
        assert torch.equal(before[name], p.detach())
    changed = [n for n, p in after.items() if p.requires_grad and not torch.equal(before[n], p.detach())]
    assert changed
    m = res.metrics
    assert m["releases_per_record"] >= 1 and 0 <= m["heldout"]["accuracy"] <= 1
    assert m["metric_dp"]["guarantee"] == "conditional" and m["metric_dp"]["shifted_mean"]
    header = Ledger.read(tmp_path / "ledger.jsonl").header
    assert header.observer == "server" and header.model_extra["metric_dp"]["mean_shift"]


def test_causal_lm_full_top_on_gpt2_at_k0() -> None:
    cfg = _cfg("tiny-gpt2", "causal_lm", steps=2, split_layer=0, mode="dchi", top_training="full")
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    wte = split.model.get_input_embeddings().weight.detach().clone()
    head = split.model.get_output_embeddings().weight.detach().clone()
    split.remove_hooks()
    res = pt.fit(cfg, TRAIN, HELDOUT, geometry=geo)
    assert torch.equal(res.model.get_input_embeddings().weight, wte)  # bottom frozen
    assert not torch.equal(res.model.get_output_embeddings().weight.detach(), head)  # untied head trained
    assert res.metrics["heldout"]["perplexity"] > 1
    evs = res.metrics["events"]
    assert any("next-token targets" in e.get("what", "") for e in evs)
    assert all(not e.get("shifted_mean", False) for e in evs if e["type"] == "dchi")


def test_server_view_inversion_clean_versus_strong_noise() -> None:
    cfg = _cfg(split_layer=0, mode="none")
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    bottom = privtune_view.bottom_info(split, geo)
    victims, aux = TRAIN[:12], HELDOUT[:30]
    results = {}
    for mode, eta in (("none", 1.0), ("dchi", 0.01)):
        s = settings.model_copy(update={"mode": mode, "eta": eta})
        noiser = pt.make_noiser(split, geo, s)
        g = torch.Generator().manual_seed(0)
        view = pt.capture_server_view(split, noiser, victims, cfg, g)
        aux_view = pt.capture_server_view(split, noiser, aux, cfg, g)
        assert [v.shape[0] for v in view.representations] == [t.numel() for t in view.token_ids]
        results[mode] = attack_representations(view.representations, view.token_ids,
                                               AuxData(aux_view.representations, aux_view.token_ids), bottom,
                                               which=["inversion_nn"])[0]["metrics"]["token_recovery"]
    assert results["none"] > 0.95  # k = 0 on Llama: the embedding table itself
    assert results["dchi"] < 0.05  # E|Z| = 100 against embeddings of norm ~0.16


def test_settings_errors_and_planned_events() -> None:
    with pytest.raises(ValueError, match=r"^options\.bogus"):
        pt.settings_of(_cfg(bogus=1))
    with pytest.raises(ValueError, match=r"^options\.eta"):
        pt.settings_of(_cfg(eta=-1))
    with pytest.raises(ValueError, match=r"^options\.split_layer"):
        _split(_cfg(split_layer=2))  # tiny-llama has 2 blocks: the top needs at least one
    from privaudit.config import resolve_plan

    cfg = _cfg(steps=4)
    plan = resolve_plan(cfg, len(TRAIN))
    events = pt.planned_events(cfg, plan)
    dchi = next(e for e in events if isinstance(e, DchiEvent))
    assert dchi.eta == pytest.approx(0.5 * 64 / scale_floor(0.5)) and dchi.count == 4 * 6 * 24
    assert any(isinstance(e, PlaintextEvent) and e.count == 24 for e in events)


@pytest.mark.slow
def test_minilm_split_view_leaks_without_noise_and_not_with_strong_noise() -> None:
    corpus = generate_corpus(n_people=400, records_per_person=3, n_canaries=0, seed=1)
    train, aux = corpus.split(0.4, seed=1, unit="person")
    cfg = parse_config({
        "mechanism": "privtune", "model": {"name": "minilm", "max_length": 40},
        "training": {"steps": 1, "batch_size": 4, "sampling": "fixed_batch"},
        "privacy": {"noise_multiplier": 0}, "options": {"split_layer": 1},
    })
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings, corpus.records)
    out = {}
    for mode, eta in (("none", 1.0), ("dchi", 0.002)):
        c = cfg.model_copy(update={"options": {**cfg.options, "mode": mode, "eta": eta}})
        inv = privtune_view.attack_server_view(c, train[:60], aux, which=["inversion_nn"], split=split, geometry=geo)
        att = privtune_view.attack_server_view(c, train[:400], aux, which=["attribute_logreg"], split=split, geometry=geo)
        out[mode] = (inv[0]["metrics"], att[0]["metrics"])
    nn_clean, attr_clean = out["none"]
    assert nn_clean["token_recovery"] > 0.9 and nn_clean["pii_exact"] > 0.5
    # the corpus' condition asides make this significant: the interval's lower end is above the majority
    assert attr_clean["beats_baseline"] and attr_clean["accuracy_ci"][0] > attr_clean["majority_baseline"]
    nn_noisy, attr_noisy = out["dchi"]  # E|Z| = 500 against a median nearest-neighbour distance ~9
    assert nn_noisy["token_recovery"] < 0.05 and nn_noisy["pii_exact"] == 0.0
    assert attr_noisy["accuracy"] < attr_clean["accuracy"] and not attr_noisy["beats_baseline"]


def test_run_study_rows_and_summary(tmp_path) -> None:
    import json

    rows = privtune_study.run_study({
        "base": {"model": {"name": "tiny-llama", "max_length": 24},
                 "data": {"synthetic": {"n_people": 40, "records_per_person": 2, "n_canaries": 0}},
                 "training": {"steps": 2, "batch_size": 6, "sampling": "fixed_batch"},
                 "privacy": {"noise_multiplier": 0, "noise_seed": 1},
                 "options": {"split_layer": 0, "knn_k": 5}},
        "vocabulary": "corpus",
        "grid": {"mode": ["none", "dchi", "privtune"], "eta": [0.01]},
        "attack": {"victims": 10, "learned_steps": 5, "optim_steps": 2},
    }, out_path=str(tmp_path / "rows.jsonl"))
    assert [(r["mode"], r["eta"]) for r in rows] == [("none", None), ("dchi", 0.01), ("privtune", 0.01)]
    assert rows[0]["utility_drop"] == 0.0
    names = [a["name"] for a in rows[0]["attacks"]]
    assert names == ["inversion_nn", "inversion_learned", "inversion_optim", "attribute_logreg", "attribute_mlp",
                     "attribute_knn"]
    nn = {r["mode"]: r["attacks"][0]["metrics"]["token_recovery"] for r in rows}
    assert nn["none"] > 0.95 and nn["dchi"] < 0.1 and nn["privtune"] < 0.1
    assert rows[1]["metric_dp"]["guarantee"] == "metric_dp" and rows[2]["metric_dp"]["shifted_mean"]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    json.dumps(rows, allow_nan=False)
    summary = privtune_study.summarise_study(rows, max_utility_drop=1.0)
    assert summary["modes"]["dchi"]["eta"] == 0.01 and "inversion_nn" in summary["modes"]["dchi"]["attacks"]


def test_example_study_config_is_valid() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "privtune_study.yaml"
    study = privtune_study.load_study(path)
    cfg = parse_config({**study.base, "mechanism": "privtune"})
    assert pt.settings_of(cfg).split_layer == 2 and "privtune" in study.grid.mode
    with pytest.raises(ValueError, match=r"^grid\.mode"):
        privtune_study.load_study({"base": {}, "grid": {"mode": ["magic"]}})


# ----------------------------------------------------------------------------------------------
# randomness: a CSPRNG by default, seeded generators on request
# ----------------------------------------------------------------------------------------------
def _forbid_prngs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's and numpy's PRNG entry points raise from now on (until the test ends)."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a non-cryptographic PRNG was drawn from")

    for name in ("randn", "rand", "randint", "normal"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "exponential_", forbidden)
    monkeypatch.setattr(np.random, "PCG64", forbidden)
    monkeypatch.setattr(np.random, "default_rng", forbidden)


def _trained(res) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in res.model.named_parameters() if p.requires_grad}


def test_default_run_draws_noise_targets_and_batches_from_the_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    """No noise_seed: the header says noise_secure, every draw of the fit (batches, random n-hop
    targets, d_χ noise, evaluation noise) goes through a SecureGenerator, torch's and numpy's PRNGs
    are never used (patched to fail; the global torch RNG state is untouched) and no torch.Generator
    is built by mechanism code. The same guards stop a seeded run, so they do bite."""
    from privaudit.runs import noise_header

    from tests.mechanisms.rng_spy import spy_generators

    cfg, seeded = _cfg(steps=2, seed=None), _cfg(steps=2)
    assert noise_header(cfg) == {"noise_source": rng.SECURE_SOURCE, "noise_secure": True}
    assert noise_header(seeded)["noise_secure"] is False
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    seen = spy_generators(monkeypatch)
    _forbid_prngs(monkeypatch)
    state = torch.get_rng_state()
    res = pt.fit(cfg, TRAIN, HELDOUT, num_labels=2, geometry=geo)
    assert res.metrics["token_releases"] > 0 and res.metrics["mean_shift_norm"] > 0
    assert seen and set(seen) == {"SecureGenerator"}
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(AssertionError):
        pt.fit(seeded, TRAIN, HELDOUT, num_labels=2, geometry=geo)


def test_seeded_runs_replay_and_default_runs_do_not() -> None:
    cfg = _cfg(steps=2, mode="privtune")
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    a, b = (_trained(pt.fit(cfg, TRAIN, HELDOUT, num_labels=2, geometry=geo)) for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    secure = _cfg(steps=2, seed=None)
    c, d = (_trained(pt.fit(secure, TRAIN, HELDOUT, num_labels=2, geometry=geo)) for _ in range(2))
    assert any(not torch.equal(c[n], d[n]) for n in c)  # fresh keys: fresh batches and noise


def test_resume_continues_the_secret_streams(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secure run's checkpoint holds its AES-CTR states (and nothing seeded); the resumed run
    continues the same training-noise keystream from where the checkpoint left it."""
    import json

    from privaudit.mechanisms.training import Checkpointer

    cfg = _cfg(steps=3, seed=None)
    split, settings = _split(cfg)
    geo = _small_geometry(split, settings)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1)

    def crash(step: int, total: int, info: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pt.fit(cfg, TRAIN, HELDOUT, num_labels=2, geometry=geo, checkpointer=ckpt, progress=crash)
    latest = ckpt.latest()
    assert latest is not None and latest.step == 2
    saved = latest.state
    noise = json.loads(saved["noise_generator"])
    assert noise["bit_generator"] == "aes-256-ctr" and noise["counter"] > 0
    assert saved["sampler"]["rng"]["bit_generator"] == "aes-256-ctr"
    made: list = []
    real = rng.noise_generator

    def spy(seed, device="cpu"):
        made.append(real(seed, device))
        return made[-1]

    monkeypatch.setattr(rng, "noise_generator", spy)
    res = pt.fit(cfg, TRAIN, HELDOUT, num_labels=2, geometry=geo, checkpointer=ckpt, resume=True)
    assert res.resumed_from_step == 2 and res.steps_done == 3
    train_gen = made[0]  # (training noise, evaluation noise), in this order
    assert train_gen.state["key"] == noise["key"] and train_gen.state["counter"] > noise["counter"]
    assert made[1].state["key"] != noise["key"]
