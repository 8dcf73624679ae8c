"""A transformer split at a layer: the device runs the bottom, the server the top. Shared by the
split-learning mechanisms (PrivTune, PAE MobiLLM) and by the attacks on what crosses the cut.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal

import torch
from torch import nn


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("bottom output reached")
        self.hidden = hidden

def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    raise ValueError(f"model: cannot tell the number of blocks of {type(model).__name__}")

def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (length = the config's number of layers)."""
    n = _num_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return module
    raise ValueError(f"model: no list of {n} transformer blocks found in {type(model).__name__}")

def _embedding_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The modules run before block 0: the input embeddings' container if it is one (BERT's
    ``embeddings``), else every ``nn.Embedding`` beside the input embeddings (GPT-2 wte/wpe)."""
    emb = model.get_input_embeddings()
    in_blocks = {id(m) for m in blocks.modules()}
    parent: nn.Module | None = None
    for _, module in model.named_modules():
        if any(child is emb for child in module.children()):
            parent = module
            break
    if parent is not None and "embedding" in type(parent).__name__.lower():
        return [parent]
    mods: list[nn.Module] = [emb]
    if parent is not None:
        mods += [c for c in parent.children() if isinstance(c, nn.Embedding) and c is not emb
                 and id(c) not in in_blocks]
    return mods

class SplitModel:
    """A Hugging Face model cut before block ``split_layer`` (see the module docstring).

    ``mode``: ``off`` (the plain model), ``release`` (block k's input is replaced by
    ``release_fn(hidden, input_ids, attention_mask)``) or ``stop`` (the forward stops at block k and
    :meth:`bottom` returns its input).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, split_layer: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = find_blocks(model)
        if not isinstance(split_layer, int) or not 0 <= split_layer < len(self.blocks):
            raise ValueError(f"options.split_layer: must be in [0, {len(self.blocks) - 1}] for this model "
                             f"({len(self.blocks)} blocks), got {split_layer!r}")
        self.k = split_layer
        self.bottom_modules: list[nn.Module] = _embedding_modules(model, self.blocks) + list(self.blocks[:split_layer])
        self.mode: Literal["off", "release", "stop"] = "off"
        self.release_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._inputs: dict[str, Any] = {}
        self._handles = [
            model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            self.blocks[split_layer].register_forward_pre_hook(self._at_split),
        ]

    # -- hooks ----------------------------------------------------------------------------------
    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                        "attention_mask": kwargs.get("attention_mask")}
        return None

    def _at_split(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.mode == "off":
            return None
        hidden = args[0]
        if self.mode == "stop":
            raise _Stop(hidden)
        ids, mask = self._inputs.get("input_ids"), self._inputs.get("attention_mask")
        if ids is None:
            raise ValueError("input_ids: the release path needs token ids (inputs_embeds are device-internal)")
        if mask is None:
            mask = torch.ones_like(ids)
        assert self.release_fn is not None
        released = self.release_fn(hidden.detach(), ids, mask)
        return (released.to(hidden.dtype),) + tuple(args[1:])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- parameters and modes -------------------------------------------------------------------
    def bottom_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.bottom_modules:
            for p in m.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def freeze_bottom(self) -> None:
        for p in self.bottom_parameters():
            p.requires_grad_(False)

    def train(self, flag: bool = True) -> None:
        """Top in train mode (if ``flag``), bottom always in eval mode (a fixed function on the device)."""
        self.model.train(flag)
        for m in self.bottom_modules:
            m.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))

    # -- bottom ---------------------------------------------------------------------------------
    def _run_to_split(self, **inputs: Any) -> torch.Tensor:
        previous = self.mode
        self.mode = "stop"
        try:
            self.model(**inputs)
        except _Stop as stop:
            return stop.hidden
        finally:
            self.mode = previous
        raise RuntimeError("model: the forward pass never reached the split block")

    @torch.no_grad()
    def bottom(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bottom's output (B, T, d) for a tokenized batch (no noise)."""
        was = self.model.training
        self.train(False)
        try:
            return self._run_to_split(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            self.train(was)

    def bottom_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The bottom's output for input *word* embeddings (B, T, d_e), differentiable w.r.t. them
        (the model adds its own position/type embeddings as for token ids)."""
        was = self.model.training
        self.train(False)
        try:
            return self._run_to_split(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        finally:
            self.train(was)

_UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>|<\|reserved_special_token_\d+\|>)$")

def special_token_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(int(i) for i in tokenizer.all_special_ids)

def candidate_token_ids(tokenizer: Any, vocab_size: int, exclude_unused: bool = True) -> torch.Tensor:
    """Token ids an attacker (and the vocabulary graph) consider: every id below ``vocab_size`` except
    special tokens and, with ``exclude_unused``, placeholder entries like ``[unused12]``."""
    special = special_token_ids(tokenizer)
    n = min(vocab_size, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    keep = [i for i, t in enumerate(tokens) if i not in special and not (exclude_unused and t and _UNUSED.match(t))]
    return torch.tensor(keep, dtype=torch.long)

def neutral_context(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer puts around a text (e.g. [CLS] ... [SEP])."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_sp) - len(plain) + 1):
        if with_sp[start:start + len(plain)] == plain:
            return list(with_sp[:start]), list(with_sp[start + len(plain):])
    return [], []

@torch.no_grad()
def vocabulary_representations(split: SplitModel, token_ids: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Each token through the bottom in a neutral context — the tokenizer's own special tokens around
    the single token ([CLS] v [SEP] for BERT-style tokenizers) — taken at the token's position.
    For k = 0 this is the embedding output (word + position/type embeddings, norm) at that position."""
    prefix, suffix = neutral_context(split.tokenizer)
    dev = split.device
    out = []
    for s in range(0, token_ids.numel(), batch_size):
        ids = token_ids[s:s + batch_size].to(dev)
        cols = [torch.full_like(ids, p) for p in prefix] + [ids] + [torch.full_like(ids, q) for q in suffix]
        x = torch.stack(cols, dim=1)
        h = split.bottom({"input_ids": x, "attention_mask": torch.ones_like(x)})
        out.append(h[:, len(prefix)].float())
    return torch.cat(out)
