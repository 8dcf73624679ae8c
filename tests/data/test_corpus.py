"""The synthetic PII corpus: determinism, contents, canaries, splits, audit key."""

from __future__ import annotations

import collections
import json
import random
import re
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from privaudit.data import (
    CANARY_FORMATS,
    KINDS,
    LABEL_NAMES,
    Corpus,
    Record,
    dataset_fingerprint,
    generate_corpus,
    random_secret,
    secret_space_size,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return generate_corpus(n_people=200, records_per_person=3, n_canaries=40, seed=7)


def test_same_seed_identical_different_seed_different() -> None:
    a = generate_corpus(n_people=60, n_canaries=8, seed=3)
    b = generate_corpus(n_people=60, n_canaries=8, seed=3)
    c = generate_corpus(n_people=60, n_canaries=8, seed=4)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert [r.text for r in a.records] != [r.text for r in c.records]
    assert {x.secret for x in a.canaries} != {x.secret for x in c.canaries}


def test_global_random_state_neither_used_nor_changed() -> None:
    random.seed(1)
    np.random.seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy())
    a = generate_corpus(n_people=30, n_canaries=4, seed=5)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    random.seed(2)
    np.random.seed(2)
    assert generate_corpus(n_people=30, n_canaries=4, seed=5) == a


def test_contents(corpus: Corpus) -> None:
    people = [r for r in corpus.records if r.canary_id is None]
    assert len(people) == 200 * 3
    assert {r.kind for r in people} == set(KINDS)
    counts = collections.Counter(r.kind for r in people)
    assert min(counts.values()) > 0.1 * len(people)  # roughly balanced
    assert corpus.label_names == LABEL_NAMES
    assert corpus.sensitive_name == "condition"
    assert {r.label for r in corpus.records} == {0, 1}
    assert 0.4 < np.mean([r.label for r in people]) < 0.6
    sensitive = collections.Counter(r.sensitive for r in people)
    assert len(sensitive) == 4 and max(sensitive.values()) < 0.6 * len(people)
    assert len({r.id for r in corpus.records}) == len(corpus.records)
    # each person's records share one person id and one sensitive value
    by_person: dict[int, set[str]] = collections.defaultdict(set)
    for r in people:
        by_person[r.person_id].add(r.sensitive)
    assert len(by_person) == 200 and all(len(v) == 1 for v in by_person.values())
    # PII fields occur verbatim in their text
    assert all(r.fields for r in people)
    assert all(v in r.text for r in corpus.records for v in r.fields.values())
    assert any("email" in r.fields for r in people) and any("phone" in r.fields for r in people)


def _naive_bayes_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Multinomial naive Bayes on lower-cased word counts (Laplace smoothing): a small, fast text model."""

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    classes = sorted({y for _, y in train})
    counts = {y: collections.Counter() for y in classes}
    for text, y in train:
        counts[y].update(words(text))
    vocab = set().union(*counts.values())
    prior = collections.Counter(y for _, y in train)
    totals = {y: sum(counts[y].values()) + len(vocab) for y in classes}

    def predict(text: str) -> str:
        def score(y: str) -> float:
            return np.log(prior[y]) + sum(np.log((counts[y][w] + 1) / totals[y]) for w in words(text) if w in vocab)

        return max(classes, key=score)

    return float(np.mean([predict(text) == y for text, y in test]))


def test_utility_label_is_learnable_from_text() -> None:
    """A word-count classifier trained on some people predicts the label of the others' records."""
    c = generate_corpus(n_people=300, n_canaries=0, seed=11)
    train, test = c.split(0.5, seed=0, unit="person")
    acc = _naive_bayes_accuracy([(r.text, str(r.label)) for r in train], [(r.text, str(r.label)) for r in test])
    assert acc > 0.9


def test_sensitive_attribute_leaks_learnably_but_not_trivially() -> None:
    """Clinical notes of unseen people reveal the condition clearly above the majority baseline,
    but far from perfectly; bios (a condition routine in 40% of them) reveal it less well."""
    c = generate_corpus(n_people=800, records_per_person=2, n_canaries=0, seed=12)
    train, test = c.split(0.4, seed=0, unit="person")

    def score(kind: str) -> tuple[float, float]:
        a = [(r.text, r.sensitive) for r in train if r.kind == kind]
        b = [(r.text, r.sensitive) for r in test if r.kind == kind]
        majority = collections.Counter(y for _, y in b).most_common(1)[0][1] / len(b)
        return _naive_bayes_accuracy(a, b), majority

    acc, majority = score("clinical_note")
    assert acc > majority + 0.2, (acc, majority)
    assert acc < 0.95, acc
    acc_bio, majority_bio = score("bio")
    assert acc_bio < acc - 0.1, (acc_bio, acc)
    for kind in ("email", "support_ticket", "product_review"):
        acc_k, majority_k = score(kind)
        assert majority_k + 0.05 < acc_k < 0.95, (kind, acc_k, majority_k)


def test_condition_asides_leave_people_labels_and_canaries_unchanged(monkeypatch) -> None:
    """The asides come from their own generator: switching them off changes texts only."""
    import privaudit.data.corpus as corpus_mod

    with_cues = generate_corpus(n_people=60, records_per_person=4, n_canaries=8, seed=5)
    monkeypatch.setattr(corpus_mod, "P_EMAIL_CUE", 0.0)
    monkeypatch.setattr(corpus_mod, "P_ITEM_CUE", 0.0)
    monkeypatch.setattr(corpus_mod, "P_BIO_CUE", 0.0)
    without = generate_corpus(n_people=60, records_per_person=4, n_canaries=8, seed=5)
    key = [(r.id, r.label, r.sensitive, r.person_id, r.kind, r.canary_id) for r in with_cues.records]
    assert key == [(r.id, r.label, r.sensitive, r.person_id, r.kind, r.canary_id) for r in without.records]
    assert with_cues.canaries == without.canaries
    changed = sum(a.text != b.text for a, b in zip(with_cues.records, without.records))
    assert changed > len(with_cues.records) // 4


def test_canary_inclusion_rate_binomial() -> None:
    for p in (0.5, 0.2):
        c = generate_corpus(n_people=20, records_per_person=1, n_canaries=600, canary_inclusion=p, seed=21)
        k = sum(x.included for x in c.canaries)
        assert binomtest(k, len(c.canaries), p).pvalue > 1e-3, (p, k)
    none = generate_corpus(n_people=10, n_canaries=20, canary_inclusion=0.0, seed=1)
    every = generate_corpus(n_people=10, n_canaries=20, canary_inclusion=1.0, seed=1)
    assert not any(x.included for x in none.canaries)
    assert all(x.included for x in every.canaries)


def test_canaries_unique_and_in_records_iff_included(corpus: Corpus) -> None:
    canaries = corpus.canaries
    assert len(canaries) == 40
    assert len({c.id for c in canaries}) == 40
    assert len({c.secret for c in canaries}) == 40
    assert {c.format for c in canaries} == set(CANARY_FORMATS)
    by_canary = {r.canary_id: r for r in corpus.records if r.canary_id is not None}
    assert set(by_canary) == {c.id for c in canaries if c.included}
    for c in canaries:
        pattern = "".join(r"\d" if ch == "#" else re.escape(ch) for ch in CANARY_FORMATS[c.format][0])
        assert re.fullmatch(pattern, c.secret), (c.format, c.secret)
        assert c.text == c.prefix + c.secret + c.suffix
        assert CANARY_FORMATS[c.format][1] in c.prefix
        holders = [r.id for r in corpus.records if c.secret in r.text]
        assert holders == ([c.id] if c.included else [])
        if c.included:
            assert by_canary[c.id] == c.to_record()
    person_ids = {r.person_id for r in corpus.records if r.canary_id is None}
    canary_persons = [c.person_id for c in canaries]
    assert len(set(canary_persons)) == 40 and not person_ids & set(canary_persons)


def test_secret_helpers() -> None:
    rng = random.Random(0)
    assert secret_space_size("pin4") == 10**4 and secret_space_size("ssn") == 10**9
    s = random_secret("ssn", rng)
    assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", s)
    with pytest.raises(ValueError, match="^format:"):
        random_secret("iban", rng)


def test_split_deterministic_disjoint_canaries_in_train(corpus: Corpus) -> None:
    train, held = corpus.split(0.25, seed=1)
    train2, held2 = corpus.split(0.25, seed=1)
    assert [r.id for r in train] == [r.id for r in train2] and [r.id for r in held] == [r.id for r in held2]
    _, held3 = corpus.split(0.25, seed=2)
    assert {r.id for r in held} != {r.id for r in held3}
    assert not {r.id for r in train} & {r.id for r in held}
    assert len(train) + len(held) == len(corpus.records)
    assert len(held) == round(0.25 * 600)
    assert all(r.canary_id is None for r in held)
    assert {r.canary_id for r in train if r.canary_id} == {c.id for c in corpus.canaries if c.included}
    pos = {r.id: i for i, r in enumerate(corpus.records)}
    assert [pos[r.id] for r in train] == sorted(pos[r.id] for r in train)  # corpus order kept


def test_split_by_person(corpus: Corpus) -> None:
    train, held = corpus.split(0.3, seed=0, unit="person")
    train_people = {r.person_id for r in train}
    held_people = {r.person_id for r in held}
    assert not train_people & held_people
    assert len(held_people) == round(0.3 * 200)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(corpus: Corpus, bad: float) -> None:
    with pytest.raises(ValueError, match="^heldout_fraction:"):
        corpus.split(bad, seed=0)


def test_audit_key_consistent_and_json(corpus: Corpus) -> None:
    train, held = corpus.split(0.2, seed=0)
    key = corpus.audit_key(train)
    assert json.loads(json.dumps(key)) == key
    assert key["seed"] == 7 and key["corpus_fingerprint"] == corpus.fingerprint()
    members = {r.canary_id for r in corpus.records if r.canary_id is not None}
    assert set(key["member_canaries"]) == members
    assert set(key["nonmember_canaries"]) == {c.id for c in corpus.canaries} - members
    assert {c["id"]: c["secret"] for c in key["canaries"]} == {c.id: c.secret for c in corpus.canaries}
    assert set(key["records"]["members"]) == {r.id for r in train}
    assert set(key["records"]["nonmembers"]) == {r.id for r in held}
    assert key["records"]["train_fingerprint"] == dataset_fingerprint(train)
    assert "records" not in corpus.audit_key()
    stranger = Record(id="zzz", text="not in corpus", label=0)
    with pytest.raises(ValueError, match="^train:"):
        corpus.audit_key([stranger])


def test_dataset_fingerprint() -> None:
    a = Record(id="a", text="hello", label=0)
    b = Record(id="b", text="world", label=1)
    fp = dataset_fingerprint([a, b])
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert dataset_fingerprint([b, a]) == fp  # order-independent
    assert dataset_fingerprint([a, Record(id="b", text="world", label=0)]) != fp  # label matters
    assert dataset_fingerprint([a, b, b]) != fp  # duplicates matter


def test_non_canary_records_never_contain_any_secret(corpus: Corpus) -> None:
    secrets = [c.secret for c in corpus.canaries]
    for r in corpus.records:
        if r.canary_id is None:
            assert not any(s in r.text for s in secrets)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_people": 0}, "n_people"),
        ({"records_per_person": 0}, "records_per_person"),
        ({"n_canaries": -1}, "n_canaries"),
        ({"canary_inclusion": 1.5}, "canary_inclusion"),
        ({"canary_formats": ("pin4", "iban")}, "format"),
    ],
)
def test_generate_rejects_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        generate_corpus(**kwargs)


def test_fast_enough() -> None:
    """< 2 s for 400 people, in CPU time (robust to other processes sharing the machine)."""
    generate_corpus(n_people=10, n_canaries=2, seed=0)  # warm imports
    t = time.process_time()
    generate_corpus(n_people=400, seed=1)
    assert time.process_time() - t < 2.0
