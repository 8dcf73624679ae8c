"""Attacks on the view of an observer other than the released model, one module per mechanism.

A mechanism's observer (ledger header) may be a server or a worker that sees what crossed the wire
rather than the released weights. The attacks on that view live here, one module per mechanism
(``dp_fedlora``, ``lora_sketch``, ``privtune``, ``pae_mobillm``, ``he_lora``); :func:`registered_view_attacks`
finds them by the mechanism's name (and the observer's, for attacks registered with
:func:`register_view_attack`). The modules are imported only when a run of that mechanism is audited.
"""

from __future__ import annotations

from importlib import import_module

from privaudit.attacks.interface import ViewAttack

# mechanism name -> "module:function" of its built-in view attacks
BUILTIN_VIEW_ATTACKS: dict[str, tuple[str, ...]] = {
    "dp_fedlora": ("privaudit.attacks.views.dp_fedlora:server_view_attacks",),
    "lora_sketch": ("privaudit.attacks.views.lora_sketch:sketch_canary_attack",),
    "privtune": ("privaudit.attacks.views.privtune:privtune_server_view",),
    "pae_mobillm": ("privaudit.attacks.views.pae_mobillm:audit_server_view",),
    "he_lora": ("privaudit.attacks.views.he_lora:he_worker_view",),
}
_VIEW_ATTACKS: dict[str, list[ViewAttack]] = {}


def register_view_attack(observer_or_mechanism: str, fn: ViewAttack) -> None:
    """Register ``fn(context) -> [AttackScores, ...]`` for runs whose mechanism or ledger observer is
    ``observer_or_mechanism`` (e.g. ``"privtune"`` or ``"server"``). Attacks registered for the
    mechanism run first; those registered for the observer next (each function at most once)."""
    if not isinstance(observer_or_mechanism, str) or not observer_or_mechanism:
        raise ValueError("observer_or_mechanism: must be a non-empty string")
    if not callable(fn):
        raise ValueError("fn: must be callable")
    fns = _VIEW_ATTACKS.setdefault(observer_or_mechanism, [])
    if fn not in fns:
        fns.append(fn)


def _builtin(mechanism: str) -> list[ViewAttack]:
    out = []
    for spec in BUILTIN_VIEW_ATTACKS.get(mechanism, ()):
        module, _, name = spec.partition(":")
        out.append(getattr(import_module(module), name))
    return out


def registered_view_attacks(mechanism: str, observer: str) -> list[ViewAttack]:
    """The view attacks of ``mechanism`` (built in, then registered), then those registered for
    ``observer`` (without repeats)."""
    out: list[ViewAttack] = []
    for fn in _builtin(mechanism) + _VIEW_ATTACKS.get(mechanism, []) + _VIEW_ATTACKS.get(observer, []):
        if fn not in out:
            out.append(fn)
    return out


__all__ = ["BUILTIN_VIEW_ATTACKS", "register_view_attack", "registered_view_attacks"]
