"""The synthetic PII corpus: fictional people, short free-text records about them, and canaries.

Everything is generated from one seed with *local* generators (a ``faker.Faker`` instance seeded with
``seed_instance`` and a ``random.Random``); no global random state is read or changed.

What the corpus contains (see ``generate_corpus``):

* People: name, age, gender, city, email, phone, medical condition, employer, job.
* Records: ``records_per_person`` short texts per person, of five kinds (``clinical_note``, ``email``,
  ``support_ticket``, ``product_review``, ``bio``).
* Utility label (``Record.label``): the record's **sentiment**, 0 = ``negative``, 1 = ``positive``,
  drawn independently per record and expressed by the record's wording (clear cue words, varied
  phrasings). Canary labels are drawn uniformly at random and are *not* expressed in the text, so a
  model can only fit them by memorising.
* Sensitive attribute (``Record.sensitive``, ``Corpus.sensitive_name == "condition"``): the person's
  medical condition category (``diabetes``, ``asthma``, ``hypertension``, ``depression``; non-uniform
  prior, majority ≈ 35%). It leaks through every kind of record in a learnable but not trivial way
  (condition-*correlated* wording, never the label's cue words): clinical notes mention
  condition-specific symptoms/medications with probability 0.6 each (generic ones otherwise), name
  the diagnosis with probability 0.25 and mention a *different* condition as family history with
  probability 0.15; emails add a condition-specific aside (a medication refill, a specialist's
  appointment, a device) with probability 0.6; tickets and reviews are about a condition-specific
  item with probability 0.52 (0.2, else 0.4 of the rest); bios mention a condition-related routine
  with probability 0.4 (otherwise a neutral one). The asides come from a second generator
  (``privaudit-corpus-cues:{seed}``), so people, labels, splits and canaries are those the corpus had
  before the asides existed; attribute inference on pooled clean representations beats the majority
  baseline clearly, while no single record kind gives it away.
* Canaries: records with a unique secret in a fixed format (``"my PIN is 4821"``), each belonging to
  its own fictional person (``person_id >= n_people``), so record-level and user-level membership of
  a canary coincide. Each canary is included in ``Corpus.records`` independently with probability
  ``canary_inclusion`` (the one-run audit of Steinke, Nasr & Jagielski 2023 assumes exactly this).
  No secret occurs in any other record's text.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Sequence

from privaudit.canonical import canonical_json

KINDS: tuple[str, ...] = ("clinical_note", "email", "support_ticket", "product_review", "bio")
LABEL_NAMES: tuple[str, ...] = ("negative", "positive")
SENSITIVE_NAME = "condition"

# --------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class Record:
    """One text example.

    ``label``: utility label (an index into the corpus' / loader's ``label_names``).
    ``sensitive``: value of the sensitive attribute (for the generated corpus: condition category).
    ``person_id``: the person (privacy unit at user level) the record is about; ``-1`` = unknown (then
    each record is its own unit). ``kind``: record type (generated: one of ``KINDS``; loaded files:
    a kind column or ``"record"``). ``canary_id``: set iff the record is a canary. ``fields``: PII values
    that occur verbatim in ``text`` (name, email, phone, city, employer, age, or a canary's secret).
    """

    id: str
    text: str
    label: int
    sensitive: str = ""
    person_id: int = -1
    kind: str = "record"
    canary_id: str | None = None
    fields: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Canary:
    """A canary: ``text == prefix + secret + suffix``; ``secret`` is the unique part.

    ``format`` names the secret's shape (see ``CANARY_FORMATS``); ``included`` says whether the canary
    is a member of the corpus (the auditor's secret). ``label``, ``person_id``, ``sensitive`` and
    ``kind`` are those of the record it is (or would have been) inserted as; ``to_record()`` builds it,
    so the auditor can score non-included canaries exactly like included ones.
    """

    id: str
    text: str
    secret: str
    format: str
    included: bool
    prefix: str = ""
    suffix: str = ""
    label: int = 0
    person_id: int = -1
    sensitive: str = ""
    kind: str = "email"
    fields: dict[str, str] = field(default_factory=dict, hash=False)

    def to_record(self) -> Record:
        return Record(
            id=self.id,
            text=self.text,
            label=self.label,
            sensitive=self.sensitive,
            person_id=self.person_id,
            kind=self.kind,
            canary_id=self.id,
            fields=dict(self.fields),
        )


# format -> (template with '#' for a random digit, phrase before the secret)
CANARY_FORMATS: dict[str, tuple[str, str]] = {
    "pin4": ("####", "my PIN is "),
    "ssn": ("###-##-####", "my SSN is "),
    "phone": ("###-###-####", "my private number is "),
    "card": ("#### #### #### ####", "my card number is "),
}


def secret_space_size(fmt: str) -> int:
    """Number of possible secrets of a format (|R| in the Secret Sharer exposure)."""
    return 10 ** _format_template(fmt).count("#")


def random_secret(fmt: str, rng: random.Random) -> str:
    """A uniformly random secret of format ``fmt`` (each ``#`` an independent digit)."""
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in _format_template(fmt))


def _format_template(fmt: str) -> str:
    if fmt not in CANARY_FORMATS:
        raise ValueError(f"format: unknown canary format {fmt!r}; known: {sorted(CANARY_FORMATS)}")
    return CANARY_FORMATS[fmt][0]


def dataset_fingerprint(records: Iterable[Record]) -> str:
    """SHA-256 (hex) of the multiset of ``(text, label)`` pairs: canonical JSON of the sorted pairs.

    Order-independent (a training set is a multiset), sensitive to duplicates, ids and metadata ignored.
    """
    pairs = sorted([r.text, int(r.label)] for r in records)
    return hashlib.sha256(canonical_json(pairs).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Records (canaries with ``included=True`` among them), all canaries, label and attribute names."""

    records: tuple[Record, ...]
    canaries: tuple[Canary, ...]
    label_names: tuple[str, ...]
    sensitive_name: str
    seed: int

    def split(
        self,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        unit: Literal["record", "person"] = "record",
    ) -> tuple[list[Record], list[Record]]:
        """Deterministic train / held-out split; both lists keep corpus order.

        ``round(heldout_fraction * n)`` non-canary units go to held-out, where a unit is a record
        (``unit="record"``) or a person with all their records (``unit="person"``). Included canaries
        always stay in train; non-included canaries are in neither list (use ``canaries``).
        """
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction!r}")
        if unit not in ("record", "person"):
            raise ValueError(f"unit: must be 'record' or 'person', got {unit!r}")
        rng = random.Random(f"privaudit-split:{seed}")
        eligible = [r for r in self.records if r.canary_id is None]
        if unit == "record":
            keys = [r.id for r in eligible]
        else:
            keys = sorted({_unit_key(r) for r in eligible})
        rng.shuffle(keys)
        held = set(keys[: round(heldout_fraction * len(keys))])
        heldout = [r for r in eligible if (r.id if unit == "record" else _unit_key(r)) in held]
        held_ids = {r.id for r in heldout}
        train = [r for r in self.records if r.id not in held_ids]
        return train, heldout

    def canary_records(self, included: bool | None = None) -> list[Record]:
        """Records of the canaries (all, or only those with ``Canary.included == included``)."""
        return [c.to_record() for c in self.canaries if included is None or c.included == included]

    def audit_key(self, train: Sequence[Record] | None = None) -> dict[str, Any]:
        """The auditor's secret, as JSON-able data: canaries (with secrets and membership) and seed.

        With ``train`` (e.g. from ``split``), also the record-level membership: ``records.members`` are
        the ids in ``train``, ``records.nonmembers`` the corpus records not in it.
        """
        key: dict[str, Any] = {
            "corpus_fingerprint": self.fingerprint(),
            "seed": self.seed,
            "sensitive_name": self.sensitive_name,
            "label_names": list(self.label_names),
            "n_records": len(self.records),
            "canaries": [
                {
                    "id": c.id,
                    "format": c.format,
                    "secret": c.secret,
                    "prefix": c.prefix,
                    "suffix": c.suffix,
                    "label": c.label,
                    "person_id": c.person_id,
                    "included": c.included,
                }
                for c in self.canaries
            ],
            "member_canaries": [c.id for c in self.canaries if c.included],
            "nonmember_canaries": [c.id for c in self.canaries if not c.included],
        }
        if train is not None:
            corpus_ids = {r.id for r in self.records}
            train_ids = [r.id for r in train]
            unknown = [i for i in train_ids if i not in corpus_ids]
            if unknown:
                raise ValueError(f"train: record {unknown[0]!r} is not in this corpus")
            member_set = set(train_ids)
            key["records"] = {
                "members": sorted(member_set),
                "nonmembers": sorted(corpus_ids - member_set),
                "train_fingerprint": dataset_fingerprint(train),
            }
        return key

    def fingerprint(self) -> str:
        """SHA-256 (hex) of everything in the corpus, canaries and their membership included."""
        body = {
            "records": [asdict(r) for r in self.records],
            "canaries": [asdict(c) for c in self.canaries],
            "label_names": list(self.label_names),
            "sensitive_name": self.sensitive_name,
            "seed": self.seed,
        }
        return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _unit_key(r: Record) -> str:
    return f"p{r.person_id}" if r.person_id >= 0 else f"r{r.id}"


# --------------------------------------------------------------------------------------------------
# Generation

_CONDITIONS: dict[str, dict[str, Any]] = {
    "diabetes": {
        "prior": 0.35,
        "meds": ["metformin", "insulin glargine", "glipizide"],
        "symptoms": ["elevated blood sugar", "frequent thirst", "numbness in the feet"],
        "items": ["glucose monitor", "insulin pen", "test strips"],
        "specialist": "endocrinologist",
        "routines": ["carb counting at every meal", "a finger-prick glucose check before lunch", "a diabetic-friendly meal plan"],
    },
    "asthma": {
        "prior": 0.25,
        "meds": ["albuterol", "a fluticasone inhaler", "montelukast"],
        "symptoms": ["wheezing", "shortness of breath at night", "chest tightness"],
        "items": ["inhaler", "peak flow meter", "nebulizer"],
        "specialist": "pulmonologist",
        "routines": ["an inhaler in every bag", "staying indoors when the pollen count is high", "breathing exercises before a run"],
    },
    "hypertension": {
        "prior": 0.25,
        "meds": ["lisinopril", "amlodipine", "losartan"],
        "symptoms": ["high blood pressure readings", "morning headaches", "dizziness when standing"],
        "items": ["blood pressure cuff", "low-sodium cookbook", "pill organizer"],
        "specialist": "cardiologist",
        "routines": ["a blood pressure reading every morning", "cooking without salt", "a daily walk on the cardiologist's advice"],
    },
    "depression": {
        "prior": 0.15,
        "meds": ["sertraline", "fluoxetine", "bupropion"],
        "symptoms": ["low mood", "trouble sleeping", "loss of interest in hobbies"],
        "items": ["light therapy lamp", "meditation app", "sleep journal"],
        "specialist": "psychiatrist",
        "routines": ["weekly therapy sessions", "a mood journal", "a support group on Thursday evenings"],
    },
}
_GENERIC_MEDS = ["ibuprofen", "a multivitamin", "acetaminophen", "vitamin D"]
_GENERIC_SYMPTOMS = ["mild fatigue", "a seasonal cold", "lower back pain", "a sore throat"]
_GENERIC_ROUTINES = ["a book club", "weekend trips to the coast", "a volunteer shift at the library",
                     "learning a new language"]
_PRODUCTS = [
    "laptop", "phone case", "coffee maker", "running shoes", "backpack", "desk lamp", "blender",
    "headphones", "water bottle", "office chair", "printer", "smart watch",
]
_HOBBIES = ["hiking", "painting", "chess", "gardening", "cooking", "cycling", "photography", "jazz"]
_GENDERS = (("female", 0.48), ("male", 0.48), ("nonbinary", 0.04))
_PRONOUNS = {"female": "She", "male": "He", "nonbinary": "They"}

_SENTIMENT: dict[str, dict[int, list[str]]] = {
    "clinical_note": {
        1: [
            "Patient says they feel much better and is happy with the care.",
            "Patient is optimistic and grateful for the quick improvement.",
            "Mood is upbeat; patient thanked the staff warmly.",
            "Patient is pleased with the progress and reports excellent energy.",
            "Patient describes the new plan as wonderful and easy to follow.",
        ],
        0: [
            "Patient is frustrated and says nothing has helped.",
            "Patient complains the treatment is awful and is upset about the long wait.",
            "Patient feels worse and is disappointed with the care so far.",
            "Patient is angry about billing mistakes and a rude front desk.",
            "Patient describes the last month as miserable and exhausting.",
        ],
    },
    "email": {
        1: [
            "The trip last weekend was wonderful, thank you for organising it!",
            "Great news: the project at {employer} went perfectly and everyone loved it.",
            "Thanks so much for the lovely dinner, I really enjoyed it.",
            "I'm thrilled with how the move went, the new place is fantastic.",
            "Just wanted to say I appreciate your help, you are the best.",
        ],
        0: [
            "I'm really annoyed that the meeting at {employer} was cancelled again.",
            "Terrible week: my car broke down and I missed the flight.",
            "I'm disappointed you never called back, this is frustrating.",
            "The landlord still hasn't fixed the heating and I'm furious.",
            "Honestly the party was a disaster and I regret going.",
        ],
    },
    "support_ticket": {
        1: [
            "Your agent fixed my {product} quickly, fantastic service, thank you!",
            "The replacement {product} works perfectly, I'm really impressed.",
            "Just closing this ticket: the {product} issue is solved and I'm very happy.",
            "Excellent support, the refund for the {product} arrived fast.",
        ],
        0: [
            "My {product} stopped working after two days and nobody replied, this is unacceptable.",
            "Third time asking: the {product} is broken and your support is useless.",
            "I was charged twice for the {product} and I'm extremely angry.",
            "The {product} arrived damaged and the return process is a nightmare.",
        ],
    },
    "product_review": {
        1: [
            "Love this {product}, great quality and worth every penny.",
            "The {product} is excellent, works beautifully and I would buy it again.",
            "Fantastic {product}, delivery was fast and it looks amazing.",
            "Really happy with the {product}, highly recommended.",
        ],
        0: [
            "Awful {product}, cheap materials and it broke within a week.",
            "The {product} is a waste of money, very disappointed.",
            "Terrible {product}, it never worked properly. Avoid.",
            "Poor quality {product} and horrible customer service.",
        ],
    },
    "bio": {
        1: [
            "{pronoun} loves {hobby} and says life has never been better.",
            "{pronoun} enjoys {hobby} on weekends and is thrilled about a recent promotion.",
            "{pronoun} is proud of the team and delighted with how the year went.",
        ],
        0: [
            "{pronoun} hates the long commute and feels burned out at work.",
            "{pronoun} is unhappy at {employer} and says the job is exhausting.",
            "{pronoun} is frustrated that {hobby} has become impossible with the awful schedule.",
        ],
    },
}
# PII fields each kind's template writes into the text
_FIELDS_BY_KIND: dict[str, tuple[str, ...]] = {
    "clinical_note": ("name", "age", "city"),
    "email": ("phone", "email", "first_name"),
    "support_ticket": ("name", "email"),
    "product_review": ("first_name", "city"),
    "bio": ("name", "age", "employer", "city"),
}
_HINTS = [
    "I have to pick up my {item} on Friday.",
    "Reminder to self: order another {item}.",
    "By the way, the {item} finally arrived.",
]
# condition-correlated asides of emails (one of these templates, filled from the person's condition)
_EMAIL_CUES = [
    "I have to pick up my {item} on Friday.",
    "Reminder to self: order another {item}.",
    "By the way, the {item} finally arrived.",
    "I need to refill my {med} before the weekend.",
    "I'm writing from the {specialist}'s waiting room.",
    "My {specialist} moved my appointment to Tuesday.",
]
_BIO_ROUTINES = ["Outside work: {routine}.", "Never skips {routine}.", "Part of the weekly routine: {routine}."]
P_EMAIL_CUE = 0.6  # probability that an email carries a condition-correlated aside
P_ITEM_CUE = 0.4  # of tickets/reviews not already about a condition item, the share that is
P_BIO_CUE = 0.4  # probability that a bio names a condition-related routine (a neutral one otherwise)


@dataclass(frozen=True)
class _Person:
    pid: int
    first: str
    last: str
    age: int
    gender: str
    city: str
    email: str
    phone: str
    condition: str
    employer: str
    job: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def generate_corpus(
    n_people: int = 400,
    records_per_person: int = 3,
    n_canaries: int = 32,
    canary_inclusion: float = 0.5,
    seed: int = 0,
    canary_formats: Sequence[str] = ("pin4", "ssn", "phone", "card"),
) -> Corpus:
    """Generate the synthetic corpus (deterministic for ``seed``; see the module docstring).

    ``n_people * records_per_person`` person records (kinds rotate from a random offset per person, so
    all five kinds are present once there are five records), plus the included canaries, shuffled.
    Canary ``j`` has format ``canary_formats[j % len(canary_formats)]`` and is included independently
    with probability ``canary_inclusion``.
    """
    if n_people < 1:
        raise ValueError(f"n_people: must be >= 1, got {n_people!r}")
    if records_per_person < 1:
        raise ValueError(f"records_per_person: must be >= 1, got {records_per_person!r}")
    if n_canaries < 0:
        raise ValueError(f"n_canaries: must be >= 0, got {n_canaries!r}")
    if not 0.0 <= canary_inclusion <= 1.0:
        raise ValueError(f"canary_inclusion: must be in [0, 1], got {canary_inclusion!r}")
    if n_canaries and not canary_formats:
        raise ValueError("canary_formats: at least one format is needed")
    for fmt in canary_formats:
        _format_template(fmt)

    from faker import Faker  # local import: keeps `import privaudit.data` light

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(f"privaudit-corpus:{seed}")
    cue_rng = random.Random(f"privaudit-corpus-cues:{seed}")  # the condition asides: rng's stream is unchanged

    people = [_make_person(pid, fake, rng) for pid in range(n_people)]
    records: list[Record] = []
    for p in people:
        offset = rng.randrange(len(KINDS))
        for k in range(records_per_person):
            kind = KINDS[(offset + k) % len(KINDS)]
            records.append(_make_record(p, kind, k, rng, cue_rng))

    canaries = _make_canaries(n_canaries, canary_inclusion, canary_formats, n_people, records, fake, rng)
    all_records = records + [c.to_record() for c in canaries if c.included]
    rng.shuffle(all_records)
    return Corpus(
        records=tuple(all_records),
        canaries=tuple(canaries),
        label_names=LABEL_NAMES,
        sensitive_name=SENSITIVE_NAME,
        seed=seed,
    )


def _weighted(rng: random.Random, options: Sequence[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options], k=1)[0]


def _make_person(pid: int, fake: Any, rng: random.Random) -> _Person:
    gender = _weighted(rng, _GENDERS)
    first = {
        "female": fake.first_name_female,
        "male": fake.first_name_male,
        "nonbinary": fake.first_name_nonbinary,
    }[gender]()
    last = fake.last_name()
    domain = rng.choice(["example.com", "example.org", "example.net"])
    local = f"{first}.{last}".lower().replace(" ", "").replace("'", "")
    return _Person(
        pid=pid,
        first=first,
        last=last,
        age=rng.randint(18, 89),
        gender=gender,
        city=fake.city(),
        email=f"{local}{rng.randint(1, 99)}@{domain}",
        phone=fake.phone_number(),
        condition=_weighted(rng, [(c, v["prior"]) for c, v in _CONDITIONS.items()]),
        employer=fake.company(),
        job=fake.job().lower(),
    )


def _make_record(p: _Person, kind: str, k: int, rng: random.Random, cue_rng: random.Random) -> Record:
    label = rng.randrange(2)
    cond = _CONDITIONS[p.condition]
    ctx = {
        "employer": p.employer,
        "product": rng.choice(_PRODUCTS),
        "hobby": rng.choice(_HOBBIES),
        "pronoun": _PRONOUNS[p.gender],
    }
    hint = ""
    if kind in ("email", "support_ticket", "product_review") and rng.random() < 0.2:
        item = rng.choice(cond["items"])
        if kind == "email":
            hint = " " + rng.choice(_HINTS).format(item=item)
        else:
            ctx["product"] = item
    # condition-correlated asides, drawn from cue_rng only (labels and rng's stream stay as they were)
    if kind == "email" and not hint and cue_rng.random() < P_EMAIL_CUE:
        hint = " " + cue_rng.choice(_EMAIL_CUES).format(
            item=cue_rng.choice(cond["items"]), med=cue_rng.choice(cond["meds"]), specialist=cond["specialist"])
    elif kind in ("support_ticket", "product_review") and ctx["product"] in _PRODUCTS and (
            cue_rng.random() < P_ITEM_CUE):
        ctx["product"] = cue_rng.choice(cond["items"])
    routine = ""
    if kind == "bio":
        pool = cond["routines"] if cue_rng.random() < P_BIO_CUE else _GENERIC_ROUTINES
        routine = " " + cue_rng.choice(_BIO_ROUTINES).format(routine=cue_rng.choice(pool))
    sentiment = rng.choice(_SENTIMENT[kind][label]).format(**ctx)

    if kind == "clinical_note":
        symptom = rng.choice(cond["symptoms"]) if rng.random() < 0.6 else rng.choice(_GENERIC_SYMPTOMS)
        med = rng.choice(cond["meds"]) if rng.random() < 0.6 else rng.choice(_GENERIC_MEDS)
        parts = [
            f"Clinical note for {p.name}, age {p.age}, {p.city}.",
            rng.choice(["Presents with {s}.", "Reports {s} over the past few weeks.", "Complains of {s}."])
            .format(s=symptom),
            rng.choice(["Currently taking {m}.", "Prescribed {m}.", "Continues {m}."]).format(m=med),
        ]
        if rng.random() < 0.25:
            parts.append(f"History of {p.condition}.")
        if rng.random() < 0.15:
            other = rng.choice([c for c in _CONDITIONS if c != p.condition])
            parts.append(f"Family history of {other}.")
        parts.append(sentiment)
        text = " ".join(parts)
    elif kind == "email":
        sign = rng.choice(["Best", "Cheers", "Thanks", "Regards"])
        text = f"Hi! {sentiment}{hint} Call {p.phone} or write to {p.email}. {sign}, {p.first}"
    elif kind == "support_ticket":
        text = f"Support ticket #{rng.randint(10000, 99999)} from {p.name} ({p.email}): {sentiment}"
    elif kind == "product_review":
        text = f"{sentiment} Review by {p.first} from {p.city}."
    else:  # bio
        text = f"{p.name} is a {p.age}-year-old {p.job} at {p.employer} who lives in {p.city}.{routine} {sentiment}"

    values = {
        "name": p.name,
        "first_name": p.first,
        "email": p.email,
        "phone": p.phone,
        "city": p.city,
        "employer": p.employer,
        "age": str(p.age),
    }
    fields = {key: values[key] for key in _FIELDS_BY_KIND[kind]}
    return Record(
        id=f"p{p.pid:04d}-{k}",
        text=text,
        label=label,
        sensitive=p.condition,
        person_id=p.pid,
        kind=kind,
        canary_id=None,
        fields=fields,
    )


def _make_canaries(
    n: int,
    inclusion: float,
    formats: Sequence[str],
    n_people: int,
    records: Sequence[Record],
    fake: Any,
    rng: random.Random,
) -> list[Canary]:
    texts = [r.text for r in records]
    used: set[str] = set()
    canaries: list[Canary] = []
    for j in range(n):
        fmt = formats[j % len(formats)]
        while True:  # unique, and never occurring in any other text (collisions are astronomically rare)
            secret = random_secret(fmt, rng)
            if secret not in used and not any(secret in u or u in secret for u in used) and not any(
                secret in t for t in texts
            ):
                break
        used.add(secret)
        first = fake.first_name()
        prefix = f"Note from {first}: {CANARY_FORMATS[fmt][1]}"
        suffix = "."
        canaries.append(
            Canary(
                id=f"canary-{j:03d}",
                text=f"{prefix}{secret}{suffix}",
                secret=secret,
                format=fmt,
                included=rng.random() < inclusion,
                prefix=prefix,
                suffix=suffix,
                label=rng.randrange(len(LABEL_NAMES)),
                person_id=n_people + j,
                sensitive=_weighted(rng, [(c, v["prior"]) for c, v in _CONDITIONS.items()]),
                kind="email",
                fields={"first_name": first, fmt: secret},
            )
        )
    return canaries
