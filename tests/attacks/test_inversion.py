"""Inversion attacks on synthetic views (a random vocabulary table, Zipf-distributed tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from privaudit.attacks.inversion import (
    ALL_ATTACKS,
    AuxData,
    BottomInfo,
    InversionSettings,
    attack_representations,
    inversion_metrics,
    nn_inversion,
    optimisation_inversion,
    pii_token_spans,
)
from privaudit.mechanisms.privtune.dchi import sample_dchi


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


V, D = 300, 16
SPECIAL = frozenset({0, 1})
FAST = InversionSettings(learned_steps=120, learned_batch=128, learned_hidden=64, optim_steps=150, optim_batch=16)


def _world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, D, generator=g)
    probs = 1.0 / torch.arange(1, V + 1).float()
    probs[:2] = 0  # specials never sampled inside a record
    probs /= probs.sum()

    def records(n: int, t: int = 12) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            body = torch.multinomial(probs, t, replacement=True, generator=g)
            out.append(torch.cat([torch.tensor([1]), body]))  # a [CLS]-like special first
        return out

    bottom = BottomInfo(torch.arange(2, V), table[2:], SPECIAL)
    return g, table, records, bottom


def _view(table: torch.Tensor, recs: list[torch.Tensor], eta: float | None, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for ids in recs:
        x = table[ids]
        if eta is not None:
            x = x + sample_dchi(len(ids), D, eta, generator=g)
        out.append(x)
    return out


def test_no_noise_nn_recovers_everything_strong_noise_falls_to_chance() -> None:
    g, table, records, bottom = _world()
    vic, aux = records(40), records(200)
    clean = attack_representations(_view(table, vic, None, g), vic, AuxData(_view(table, aux, None, g), aux), bottom,
                                   which=["inversion_nn"])[0]
    assert clean["name"] == "inversion_nn" and clean["kind"] == "inversion"
    assert clean["metrics"]["token_recovery"] == 1.0 and clean["metrics"]["token_f1"] == 1.0
    assert clean["metrics"]["n_tokens"] == 40 * 12  # the special token is not scored
    noisy = attack_representations(_view(table, vic, 0.05, g), vic, AuxData(_view(table, aux, 0.05, g), aux), bottom,
                                   which=["inversion_nn", "inversion_learned"], settings=FAST)
    chance = noisy[0]["metrics"]["chance_rate"]
    assert 0 < chance < 0.3
    assert noisy[0]["metrics"]["token_recovery"] < 0.05  # NN: near 1/V
    # the learned model can at best learn the prior: about the most frequent token's rate
    assert noisy[1]["metrics"]["token_recovery"] <= chance + 0.08
    json.dumps(noisy, allow_nan=False)


def test_learned_inversion_undoes_a_deterministic_shift() -> None:
    g, table, records, bottom = _world(1)
    shift = torch.randn(V, D, generator=g) * 1.2
    vic, aux = records(40), records(300)

    def shifted(recs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [table[ids] + shift[ids] for ids in recs]

    res = attack_representations(shifted(vic), vic, AuxData(shifted(aux), aux), bottom,
                                 which=["inversion_nn", "inversion_learned"], settings=FAST)
    nn_rate, learned_rate = (r["metrics"]["token_recovery"] for r in res)
    assert nn_rate < 0.8
    assert learned_rate > nn_rate + 0.15


def test_optimisation_inversion_recovers_tokens_through_a_nonlinear_bottom() -> None:
    g, _, records, _ = _world(2)
    emb = torch.randn(V, 8, generator=g)
    w = torch.randn(8, D, generator=g) / 8**0.5

    def bottom_fn(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(e @ w) * 3 + e.mean(dim=1, keepdim=True) @ w  # context mixes positions

    vic = records(12)
    obs = [bottom_fn(emb[ids][None], torch.ones(1, len(ids)))[0].detach() for ids in vic]
    # vocabulary representations in a neutral context (alone): context shifts them
    vocab = torch.stack([bottom_fn(emb[i][None, None], torch.ones(1, 1))[0, 0] for i in range(2, V)]).detach()
    bottom = BottomInfo(torch.arange(2, V), vocab, SPECIAL, embedding_matrix=emb, forward_embeds=bottom_fn)
    wrong = [torch.randint(2, V, (len(ids),), generator=g) for ids in vic]
    pred = optimisation_inversion(obs, bottom, FAST, init=wrong)
    rate = inversion_metrics(pred, vic, SPECIAL)["token_recovery"]
    start = inversion_metrics(wrong, vic, SPECIAL)["token_recovery"]
    assert start < 0.05 and rate > 0.8


def test_pii_scoring_and_spans() -> None:
    from privaudit.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    text = "Write to john.smith12@example.com or call 555-0100, John Smith"
    ids = torch.tensor(tok(text)["input_ids"])
    spans = pii_token_spans(tok, ids, {"email": "john.smith12@example.com", "name": "John Smith", "age": "77"})
    names = [s[0] for s in spans]
    assert names.count("email") == 1 and names.count("name") == 1 and "age" not in names
    pred = ids.clone()
    name_span = next(s for s in spans if s[0] == "name")
    pred[name_span[1]] = 0  # break one name token
    m = inversion_metrics([pred], [ids], frozenset(tok.all_special_ids), pii_spans=[spans])
    assert m["pii_fields"]["email"]["exact"] == 1.0 and m["pii_fields"]["name"]["exact"] == 0.0
    assert m["pii_exact"] == 0.5


def test_entry_point_contract() -> None:
    g, table, records, bottom = _world(3)
    vic, aux = records(30), records(60)
    pooled = [table[ids].mean(0) for ids in vic]
    sens = [str(i % 2) for i in range(30)]
    res = attack_representations(pooled, None, AuxData([table[ids].mean(0) for ids in aux], None,
                                                       [str(i % 2) for i in range(60)]),
                                 which=list(ALL_ATTACKS), sensitive=sens)
    assert [r["name"] for r in res] == list(ALL_ATTACKS)
    assert all("skipped" in r for r in res[:3]) and all(r["kind"] == "attribute" for r in res[3:])
    with pytest.raises(ValueError, match="^which"):
        attack_representations(pooled, None, AuxData(pooled), which=["inversion_magic"])
    with pytest.raises(ValueError, match="^bottom"):
        attack_representations(_view(table, vic, None, g), vic, AuxData(_view(table, aux, None, g), aux),
                               which=["inversion_nn"])
    assert nn_inversion(_view(table, vic[:2], None, g), bottom)[0].shape == vic[0].shape
