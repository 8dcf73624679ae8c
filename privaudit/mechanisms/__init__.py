"""Private fine-tuning mechanisms, found by name: ``dp_lora`` (with the shared DP-SGD machinery in
``training``, ``per_sample``, ``sampling``; ``split_model`` for split learning) and one package per
other method (``dp_fedlora``, ``lora_sketch``, ``privtune``, ``pae_mobillm``, ``he_lora``) whose
``mechanism`` module is what the registry loads.

A mechanism module exposes:

* ``NAME`` (str) and ``OBSERVER`` (who its guarantee is against, e.g. ``"released model"``);
* ``planned_events(cfg, plan) -> list[Event]``: the events a finished run appends to its ledger;
* ``fit(cfg, train_records, heldout_records, *, ledger=None, progress=None, ...) -> FitResult``.

Optional hooks (read with ``getattr``; :mod:`privaudit.runs` and the auditor use them when present):

* ``ledger_header_extra(cfg) -> dict``: extra ledger-header fields, passed to ``Ledger.create``
  (e.g. PrivTune's ``metric_dp`` entry);
* ``privacy_section(ledger, plan, cfg, metrics=None) -> dict``: the manifest's ``privacy`` section in
  place of the (ε, δ) accountants' ``epsilon_section`` (e.g. a metric-DP report, or separate
  guarantees against a worker and for the released model); ``metrics`` are the fit's metrics. It must
  never report ε = 0 for something released without a guarantee;
* ``load_released_model(cfg, num_labels, device, state) -> (model, tokenizer)``: rebuild the released
  model from ``adapter.safetensors`` (else :func:`privaudit.mechanisms.training.build_model`);
* ``RESUMABLE = False``: ``train(..., resume=True)`` is refused with a ``ValueError``;
* ``AUDIT_RELEASED_MODEL = True``: the auditor also runs the released-model attacks (membership,
  canaries) when the ledger's observer is not the released model;
* view attacks: the attacks on the view of an observer other than the released model live in
  :mod:`privaudit.attacks.views` (one module per mechanism, found by its ``NAME``).

Modules are imported lazily (``import privaudit.mechanisms`` stays light). Register another with
:func:`register_mechanism`.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from privaudit.config import MECHANISM_MODULES, mechanism_names, register_mechanism


def get_mechanism(name: str) -> ModuleType:
    """The module implementing mechanism ``name``; ``ValueError`` naming it if unknown."""
    if name not in MECHANISM_MODULES:
        raise ValueError(f"mechanism: unknown {name!r} (choose from {', '.join(mechanism_names())})")
    return import_module(MECHANISM_MODULES[name])


__all__ = ["get_mechanism", "mechanism_names", "register_mechanism"]
