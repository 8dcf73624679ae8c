"""Helpers for the external-audit tests: a tiny causal LM saved as a safetensors folder, synthetic
records, and LoRA fine-tuning written with plain torch/transformers/PEFT (no privaudit import), as a
user outside privaudit would train."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

_FIRST = ["alice", "bruno", "chen", "dana", "emil", "fatima", "gosia", "hugo", "ines", "jonas", "kofi", "lena",
          "marek", "nadia", "oscar", "priya", "quinn", "rosa", "sven", "tara"]
_LAST = ["moreno", "kowalski", "okafor", "lindqvist", "tanaka", "dubois", "novak", "silva", "haddad", "brown",
         "fischer", "rossi", "meyer", "santos", "ivanova", "park"]
_CITY = ["leeds", "porto", "krakow", "lyon", "graz", "turku", "gent", "bilbao", "brno", "cork"]
_COND = ["asthma", "diabetes", "migraine", "anaemia", "eczema", "gout", "angina", "bronchitis"]


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` distinct synthetic patient records (same distribution for every seed)."""
    rng = random.Random(1000 + seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        t = (f"{rng.choice(_FIRST)} {rng.choice(_LAST)} from {rng.choice(_CITY)} , born {rng.randint(1940, 2005)} , "
             f"treated for {rng.choice(_COND)} , card {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} .")
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def build_tokenizer() -> Any:
    """A word-level tokenizer over the records' vocabulary (digits one by one), small enough that a
    tiny model trains in seconds; BOS prepended, no EOS (as GPT-2 tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"] + [str(d) for d in range(10)] + sorted(
        set(_FIRST + _LAST + _CITY + _COND + ["from", "born", "treated", "for", "card", ",", ".", "my", "pin", "is",
                                              "the", "code", "of"]))
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def build_base(out_dir: str | Path, seed: int = 0, pretrain_texts: list[str] | None = None,
               pretrain_epochs: int = 0, *, with_pad: bool = True) -> Path:
    """A tiny GPT-2 (2 layers, width 64, word-level tokenizer) saved as a safetensors folder with its
    tokenizer; optionally pre-trained (all weights) on public texts."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    if pretrain_texts and pretrain_epochs:
        _fit(model, tok, pretrain_texts, pretrain_epochs, lr=3e-3, seed=seed)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def _fit(model, tok, texts: list[str], epochs: int, lr: float, seed: int, batch_size: int = 10) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            batch = tok([texts[i] for i in order[s:s + batch_size]], padding=True, return_tensors="pt")
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def train_lora_plain(base_dir: str | Path, texts: list[str], out_dir: str | Path, *, epochs: int = 30,
                     lr: float = 1e-2, rank: int = 16, seed: int = 0) -> Path:
    """Fine-tune a LoRA adapter on ``texts`` with plain PEFT and save it with ``save_pretrained``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True, use_safetensors=True)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    _fit(model, tok, texts, epochs, lr, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
