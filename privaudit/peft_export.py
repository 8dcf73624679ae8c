"""Write a run's LoRA adapter in PEFT's own format (``RUN_DIR/peft/adapter_config.json`` and
``adapter_model.safetensors``), so that any Hugging Face code loads it with
``PeftModel.from_pretrained(base, RUN_DIR / "peft")`` and ``privaudit audit --model BASE --adapter
RUN_DIR/peft`` audits it like any checkpoint.

privaudit's LoRA *is* PEFT's (:func:`privaudit.models.apply_lora` wraps the base with
``peft.get_peft_model``), so names and shapes need no conversion: the adapter is written by PEFT's
``save_pretrained`` (safetensors only). It is the same release as ``adapter.safetensors`` (no new
privacy cost). Not written when the model is not a PEFT model or trains parameters outside the LoRA
factors (e.g. a classification head, which PEFT's adapter file would not carry): then the file would
not reproduce the released model; the run's manifest then says why in one line
(``peft_export``, :func:`peft_export_refusal`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PEFT_DIR", "peft_export_refusal", "write_peft_adapter"]

PEFT_DIR = "peft"


def peft_export_refusal(model: Any) -> str | None:
    """Why ``model``'s release cannot be written as a PEFT adapter (one line), or None when it can:
    not a PEFT model, or a trainable parameter outside the LoRA factors (a trained classification head,
    the new-token canaries' rows of ``audit.lm_canary_train_new_tokens``) that PEFT's adapter file
    would silently drop."""
    from peft import PeftModel

    from privaudit.models import _unwrap

    m = _unwrap(model)
    if not isinstance(m, PeftModel):
        return "the model is not a PEFT model"
    extra = next((n for n, p in m.named_parameters() if p.requires_grad and ".lora_" not in n), None)
    if extra is not None:
        return (f"trainable parameter {extra} is not a LoRA factor: a PEFT adapter would not carry it "
                "(the release is adapter.safetensors)")
    return None


def write_peft_adapter(model: Any, out_dir: str | Path, *, base_model: str) -> bool:
    """Write ``model``'s LoRA adapter with PEFT's ``save_pretrained`` into ``out_dir``, naming
    ``base_model`` as its base; True if written, False if the model cannot be written faithfully
    (:func:`peft_export_refusal` says why)."""
    from privaudit.models import _unwrap

    if peft_export_refusal(model) is not None:
        return False
    m = _unwrap(model)
    for cfg in m.peft_config.values():
        cfg.base_model_name_or_path = base_model
    import warnings

    with warnings.catch_warnings():  # PEFT looks for the base's config under its name: a bundled name has none
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        m.save_pretrained(str(out_dir), safe_serialization=True)
    return True
