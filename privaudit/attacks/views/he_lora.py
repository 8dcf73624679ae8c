"""What an HE-LoRA worker sees, as inputs for the shared representation attacks.

The worker of an HE-LoRA run (:mod:`privaudit.mechanisms.he_lora.mechanism`) receives, per remote product, the
ciphertext of the quantized input rows (one row per token position) and returns an encrypted result
it computed itself (a function of what it received and its own weights: it adds no information). The
most informative rows are the inputs of the **first** remote layer (closest to the token embeddings).

This module reproduces those rows for given records from the released model (the base weights are
frozen and the first remote layer sits before any trained LoRA branch can change its input only
through earlier layers — the released adapter is used, so the inputs are those of the trained model):

* :func:`first_remote_inputs` — the float inputs of the first remote layer, one (T_i, k) tensor per
  record (real tokens only; padding rows carry no token);
* :func:`quantized_view` — what an *unencrypted* worker would receive (the ``simulate`` backend's
  message bodies: the n-bit integers); the positive control of the audit;
* :func:`ciphertext_view` — each row encrypted by the backend, as features: the ciphertext bytes read
  as little-endian uint64 words scaled to [0, 1) (a row of the GLWE backend is ~10 kB, 1,264 words).

Attacks then run on these views exactly as on any released representation
(:func:`privaudit.attacks.inversion.attack_representations`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from privaudit.attacks.interface import AttackScores, AuditContext
from privaudit.attacks.views.common import (
    _CLIENTS,
    HE_BUDGET,
    _has_attribute,
    _to_scores,
    _victims,
    auxiliary_records,
)

if TYPE_CHECKING:
    pass

__all__ = ["first_remote_inputs", "quantized_view", "ciphertext_view", "ciphertext_features", "vocabulary_inputs"]


@torch.no_grad()
def first_remote_inputs(model: torch.nn.Module, tokenizer: Any, records: Sequence[Any], cfg: Any,
                        remote_lm_head: bool = False, batch_size: int = 32
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(inputs, token ids, layer name): the first remote layer's input rows for each record's real
    tokens, its token ids, and which layer that is (:func:`privaudit.mechanisms.he_lora.mechanism.remote_candidates`)."""
    from privaudit.mechanisms.he_lora.mechanism import remote_candidates
    from privaudit.mechanisms.training import encode

    cands = remote_candidates(model, remote_lm_head)
    if not cands:
        raise ValueError("model: no frozen base linear layer would be sent to a worker")
    name, layer = cands[0]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    device = next(model.parameters()).device
    xs: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    was = model.training
    model.eval()
    try:
        for s in range(0, len(records), batch_size):
            batch = encode(tokenizer, list(records[s:s + batch_size]), cfg, device)
            captured.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            x = captured[0]
            mask = batch["attention_mask"].bool()
            x = x.reshape(mask.shape[0], mask.shape[1], -1)
            for i in range(mask.shape[0]):
                xs.append(x[i][mask[i]].float().cpu())
                ids.append(batch["input_ids"][i][mask[i]].cpu())
    finally:
        handle.remove()
        model.train(was)
    return xs, ids, name


def quantized_view(inputs: Sequence[torch.Tensor], n_bits: int) -> list[torch.Tensor]:
    """Per record, the n-bit integers an unencrypted worker would receive (as float32)."""
    from privaudit.mechanisms.he_lora.backend import quantize_rows

    return [torch.from_numpy(quantize_rows(x.double().numpy(), n_bits).values.astype(np.float32))
            for x in inputs]


def ciphertext_features(blob: bytes) -> np.ndarray:
    """A ciphertext's bytes as little-endian uint64 words scaled to [0, 1) (trailing bytes padded)."""
    pad = (-len(blob)) % 8
    words = np.frombuffer(blob + b"\0" * pad, dtype="<u8")
    return (words.astype(np.float64) / 2.0 ** 64).astype(np.float32)


def ciphertext_view(inputs: Sequence[torch.Tensor], n_bits: int, client: Any) -> list[torch.Tensor]:
    """Per record, each token row quantized and encrypted on its own by ``client``
    (:meth:`privaudit.mechanisms.he_lora.backend.HEBackend.keygen`), as (T_i, words) features."""
    out: list[torch.Tensor] = []
    for q in quantized_view(inputs, n_bits):
        rows = [ciphertext_features(client.encrypt_rows(q[i:i + 1].numpy().astype(np.int64)))
                for i in range(q.shape[0])]
        out.append(torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 1))
    return out


@torch.no_grad()
def vocabulary_inputs(model: torch.nn.Module, tokenizer: Any, token_ids: torch.Tensor, remote_lm_head: bool = False,
                      batch_size: int = 512) -> torch.Tensor:
    """(V, k): the first remote layer's input for each token alone in the tokenizer's neutral context
    (its own special tokens around it), at the token's position — the attacker's vocabulary table."""
    from privaudit.mechanisms.he_lora.mechanism import remote_candidates
    from privaudit.mechanisms.split_model import neutral_context

    _, layer = remote_candidates(model, remote_lm_head)[0]
    prefix, suffix = neutral_context(tokenizer)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, token_ids.numel(), batch_size):
            ids = token_ids[s:s + batch_size].to(device)
            cols = [torch.full_like(ids, p) for p in prefix] + [ids] + [torch.full_like(ids, q) for q in suffix]
            x = torch.stack(cols, dim=1)
            captured.clear()
            model(input_ids=x, attention_mask=torch.ones_like(x))
            h = captured[0].reshape(x.shape[0], x.shape[1], -1)
            out.append(h[:, len(prefix)].float().cpu())
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(out)


def _client(backend: Any) -> Any:
    """One key pair per backend parameter set and process (key generation takes seconds)."""
    import json

    key = json.dumps(backend.parameters(), sort_keys=True, default=str)
    if key not in _CLIENTS:
        _CLIENTS[key] = backend.keygen()
    return _CLIENTS[key]

def he_worker_view(ctx: AuditContext) -> list[AttackScores]:
    """Inversion and attribute attacks on the ciphertexts an HE-LoRA worker received, with the same
    attacks on the unencrypted quantized rows as a positive control (see the module docstring).

    The victims' rows are encrypted under a fresh key of the run's scheme (the run's key is not kept;
    ciphertexts under any key of the scheme are identically distributed). The attacker is *stronger*
    than the real worker: it may encrypt its auxiliary records and the vocabulary under that same key
    (an encryption oracle), and it trains its inverter on those pairs."""
    import torch

    from privaudit.attacks.inversion import AuxData, BottomInfo, attack_representations
    from privaudit.attacks.views.he_lora import (
        ciphertext_view,
        first_remote_inputs,
        quantized_view,
        vocabulary_inputs,
    )
    from privaudit.mechanisms.he_lora.backend import get_backend, glwe_available
    from privaudit.mechanisms.he_lora.mechanism import HESettings

    cfg = ctx.run.config
    settings = HESettings.from_options(cfg.options)
    budget = HE_BUDGET
    confidence = float(ctx.settings.get("confidence", 0.95))
    cap = int(ctx.settings.get("max_records", 1000))
    victims = _victims(ctx, min(budget.inversion_victims, cap))
    aux, aux_text = auxiliary_records(ctx, budget.aux_people)
    model, tok = ctx.run.model, ctx.run.tokenizer
    ctx.log(f"he_lora: the worker's view of {len(victims)} records")
    x_vic, ids_vic, layer = first_remote_inputs(model, tok, victims, cfg, settings.remote_lm_head)
    x_aux, ids_aux, _ = first_remote_inputs(model, tok, aux, cfg, settings.remote_lm_head)
    special = frozenset(int(i) for i in tok.all_special_ids)
    cand = sorted({int(t) for ids in ids_vic + ids_aux for t in ids.tolist()} - special)
    if len(cand) < budget.max_vocabulary:  # more of the corpus' tokens, as candidates the attacker may consider
        extra = sorted({int(t) for r in ctx.data.corpus.records[:500] for t in tok(r.text)["input_ids"]}
                       - special - set(cand))
        cand += extra[: budget.max_vocabulary - len(cand)]
    cand = sorted(cand)
    vocab_ids = torch.tensor(cand, dtype=torch.long)
    vocab_x = vocabulary_inputs(model, tok, vocab_ids, settings.remote_lm_head)
    which = ["inversion_nn", "inversion_learned"]
    attribute = _has_attribute(victims) and _has_attribute(aux)
    if attribute:
        which += ["attribute_logreg", "attribute_mlp", "attribute_knn"]
    from privaudit.attacks.inversion import InversionSettings, pii_token_spans

    inv_settings = InversionSettings(learned_steps=budget.learned_steps, learned_hidden=budget.learned_hidden)
    spans = [pii_token_spans(tok, ids, r.fields) for ids, r in zip(ids_vic, victims)]
    sens_vic = [r.sensitive for r in victims]
    sens_aux = [r.sensitive for r in aux]

    def run(vic: list[Any], aux_view: list[Any], vocab: Any) -> list[dict[str, Any]]:
        return attack_representations(vic, ids_vic, AuxData(aux_view, ids_aux, sens_aux),
                                      BottomInfo(vocab_ids, vocab, special), which=which, sensitive=sens_vic,
                                      pii_spans=spans, settings=inv_settings, seed=ctx.seed)

    n = settings.n_bits
    ctx.log("he_lora: positive control on the unencrypted quantized rows")
    control = run(quantized_view(x_vic, n), quantized_view(x_aux, n), torch.stack(quantized_view([vocab_x], n))[0])
    base = (f"first remote layer '{layer}', {n}-bit per-token quantization; attacker's auxiliary data: {aux_text}; "
            f"{len(cand)} candidate tokens")
    out = _to_scores(control, "control_unencrypted_",
                     "positive control: the same attack on the quantized rows a worker would receive WITHOUT "
                     f"encryption (shows the attack's power); {base}", confidence)
    not_applicable = {"name": "inversion_optim", "kind": "inversion", "metrics": {},
                      "skipped": "not applicable: without the secret key a ciphertext is not a differentiable "
                                 "function of the input"}
    if settings.mode == "clear":
        skipped = [dict(not_applicable, name=w, skipped="clear mode: the run used no worker") for w in which]
        return out + _to_scores(skipped, "worker_", "nothing was sent to a worker", confidence)
    if not glwe_available():
        skipped = [dict(not_applicable, name=w, skipped="the glwe backend (concrete-ml-extensions) is not installed")
                   for w in which]
        return out + _to_scores(skipped, "worker_", base, confidence)
    ctx.log("he_lora: encrypting the worker's view (GLWE)")
    backend = get_backend(settings.backend)
    client = _client(backend)
    enc_vic = ciphertext_view(x_vic, n, client)
    enc_aux = ciphertext_view(x_aux, n, client)
    enc_vocab = ciphertext_view([vocab_x], n, client)[0]
    worker = run(enc_vic, enc_aux, enc_vocab) + [not_applicable]
    note = (f"worker's view: each token row's {backend.scheme} ciphertext ({backend.security_bits}-bit security "
            f"stated), as uint64 words; the attacker gets an encryption oracle under the victims' key (stronger "
            f"than the real worker); the run was in {settings.mode} mode; {base}")
    return out + _to_scores(worker, "worker_", note, confidence)
