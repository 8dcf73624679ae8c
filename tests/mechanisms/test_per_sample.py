"""Per-sample gradients and clipped sums against batch-size-1 autograd (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privaudit.mechanisms.per_sample import CLIP_EPS, PerSampleGradients, choose_norm_method
from privaudit.mechanisms.training import per_sample_losses
from privaudit.models import MINILM, TINY_GPT2, TINY_LLAMA, LoraSettings, apply_lora, encode_batch, load_base_model

TEXTS = [
    "Patient reports mild headache and fatigue; follow-up in two weeks.",
    "Great product, would buy again!",
    "my PIN is 4821",
    "The support ticket was closed without any answer, which is very disappointing for a paying customer.",
]
LABELS = [1, 1, 0, 0]


def _model(name: str, task: str) -> tuple[nn.Module, object]:
    overrides = {} if name == MINILM else {"n_layer": 2} if name == TINY_GPT2 else {"num_hidden_layers": 2}
    model, tok = load_base_model(name, task, num_labels=2, seed=1, **overrides)
    targets = None if name != TINY_GPT2 else ["c_attn", "c_proj"]
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, target_modules=targets, train_head=True), seed=2)
    model = model.double().eval()  # eval: no dropout, so the per-sample and single passes agree
    with torch.no_grad():  # B = 0 at init: give B non-zero values so A's gradients are non-trivial
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(abs(hash(n)) % 2**31))
    return model, tok


def _batch(tok: object, texts: list[str], labels: list[int], task: str) -> dict[str, torch.Tensor]:
    b = encode_batch(tok, texts, 32, lm_labels=task == "causal_lm")
    if task == "classification":
        b["labels"] = torch.tensor(labels)
    return b


def _reference(model: nn.Module, tok: object, task: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for text, label in zip(TEXTS, LABELS):
        model.zero_grad(set_to_none=True)
        per_sample_losses(model, _batch(tok, [text], [label], task), task).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


CASES = [(TINY_GPT2, "causal_lm"), (TINY_LLAMA, "causal_lm"), (MINILM, "classification"),
         (TINY_GPT2, "classification"), (TINY_LLAMA, "classification")]


@pytest.mark.parametrize("name,task", CASES)
def test_per_sample_matches_autograd(name: str, task: str) -> None:
    model, tok = _model(name, task)
    _assert_matches_autograd(model, tok, task)


def _assert_matches_autograd(model: nn.Module, tok: object, task: str,
                             methods: tuple[str, ...] = ("ghost", "materialise", "auto")) -> None:
    ref = _reference(model, tok, task)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if task == "classification":
        assert any("lora" not in n for n in trainable), "the classification head must be trainable"
    ref_norms = torch.stack([torch.sqrt(sum(r[n].pow(2).sum() for n in trainable)) for r in ref])
    clip = float(ref_norms.median())  # some samples clipped, some not
    factors = (clip / (ref_norms + CLIP_EPS)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    batch = _batch(tok, TEXTS, LABELS, task)
    for method in methods:
        psg = PerSampleGradients(model, method)  # type: ignore[arg-type]
        assert psg.parameter_names == trainable
        per_sample_losses(model, batch, task).sum().backward()
        model.zero_grad(set_to_none=True)

        grads = psg.per_sample_grads()
        for n in trainable:
            expected = torch.stack([r[n] for r in ref])
            torch.testing.assert_close(grads[n], expected, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(psg.sq_norms().sqrt(), ref_norms, rtol=1e-5, atol=1e-9)
        out = psg.clip(clip)
        torch.testing.assert_close(out.factors, factors, rtol=1e-6, atol=0)
        for n in trainable:
            expected = sum(f * r[n] for f, r in zip(factors, ref))
            torch.testing.assert_close(out.grads[n], expected, rtol=1e-5, atol=1e-9)
        psg.remove()


# SmolLM2-135M's Llama layers: grouped-query attention (9 query / 3 key-value heads of 64), RMSNorm,
# SiLU-gated MLP, tied input/output embeddings; LoRA on every attention and MLP projection.
SMOLLM2_ARCH = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_smollm2(model: nn.Module) -> nn.Module:
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, frozen
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, target_modules=SMOLLM2_TARGETS), seed=2)
    model = model.double().eval()
    with torch.no_grad():
        for i, (n, p) in enumerate(sorted(model.named_parameters(), key=lambda x: x[0])):
            if ".lora_B." in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(SMOLLM2_TARGETS)
    return model


def test_per_sample_matches_autograd_smollm2_architecture() -> None:
    """SmolLM2's architecture (its config, one layer, seeded random weights): fast, no weights needed."""
    model, tok = load_base_model(TINY_LLAMA, "causal_lm", seed=3, num_hidden_layers=1, **SMOLLM2_ARCH)
    _assert_matches_autograd(_lora_smollm2(model), tok, "causal_lm", ("materialise", "auto"))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [2, None])
def test_per_sample_matches_autograd_smollm2_real_weights(layers: int | None) -> None:
    """The real SmolLM2-135M weights and tokenizer: its first two layers, then the whole model (slow)."""
    from privaudit.models import SMOLLM2

    overrides = {} if layers is None else {"num_hidden_layers": layers}
    model, tok = load_base_model(SMOLLM2, "causal_lm", **overrides)
    assert len(model.model.layers) == (layers or 30)
    _assert_matches_autograd(_lora_smollm2(model), tok, "causal_lm", ("auto",) if layers is None else
                             ("ghost", "materialise", "auto"))


def test_linear_used_twice_and_bias() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    frozen = nn.Linear(3, 5).double().requires_grad_(False)

    def f(x: torch.Tensor) -> torch.Tensor:  # the same layer twice in one forward pass
        return lin(torch.tanh(frozen(lin(x)))).pow(2).sum(dim=(1, 2))

    x = torch.randn(6, 4, 5, dtype=torch.double)
    for method in ("ghost", "materialise"):
        psg = PerSampleGradients(lin, method)  # type: ignore[arg-type]
        f(x).sum().backward()
        got = psg.per_sample_grads()
        norms = psg.sq_norms()
        for b in range(6):
            lin.zero_grad()
            psg.enabled = False
            f(x[b:b + 1]).sum().backward()
            psg.enabled = True
            torch.testing.assert_close(got["weight"][b], lin.weight.grad)
            torch.testing.assert_close(got["bias"][b], lin.bias.grad)
            torch.testing.assert_close(norms[b], lin.weight.grad.pow(2).sum() + lin.bias.grad.pow(2).sum())
        psg.remove()
        lin.zero_grad()


def test_unsupported_trainable_module_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"^trainable parameter 1\.weight: no per-sample gradient rule"):
        PerSampleGradients(model)
    with pytest.raises(ValueError, match="^norm_method"):
        PerSampleGradients(nn.Linear(2, 2), "fast")  # type: ignore[arg-type]


def test_norm_method_rule() -> None:
    assert choose_norm_method(64, 256, 8) == "materialise"  # LoRA A
    assert choose_norm_method(64, 8, 768) == "materialise"  # LoRA B: ghost would cost more time
    assert choose_norm_method(1, 384, 2) == "ghost"  # pooled classification head
    assert choose_norm_method(16, 1024, 1024) == "ghost"
    assert choose_norm_method(4096, 64, 64) == "materialise"


def test_shared_trainable_parameter_is_refused() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # tied
    with pytest.raises(ValueError, match="shared with"):
        PerSampleGradients(nn.Sequential(a, b))
