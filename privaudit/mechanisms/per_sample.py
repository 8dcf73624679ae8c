"""Per-sample gradient norms and clipped gradient sums, computed from layer inputs and output-gradients.

For a linear layer ``y = x Wᵀ + b`` applied to the tokens of one sample, the sample's gradient is

    ∇W = Σ_t g_t x_tᵀ        ∇b = Σ_t g_t

where ``x_t`` is the layer input and ``g_t = ∂loss/∂y_t`` for token ``t``. Forward hooks keep ``x`` (a
view of what autograd saves anyway) and a tensor hook on the output keeps ``g`` during the backward
pass of the *summed* per-sample loss. After the backward pass:

* per-sample squared norms, by one of two rules per layer:
  - ``ghost``: ‖∇W‖² = Σ_{t,s} (x_t·x_s)(g_t·g_s) from two T×T Gram matrices, without materialising
    ∇W (memory B·T², time B·T²·(d_in+d_out));
  - ``materialise``: ∇W per sample by einsum (memory B·d_in·d_out, time B·T·d_in·d_out);
  ``auto`` takes ghost only where it is cheaper in memory (T² < d_in·d_out, the usual criterion) *and*
  in time (T·(d_in+d_out) < d_in·d_out). LoRA factors (one side of rank r) almost always materialise;
  a classification head on a pooled vector (T = 1) takes the ghost rule.
* the clipped sum Σ_b c_b ∇W_b with c_b = min(1, C / (‖∇_b‖ + 1e-6)), where ‖∇_b‖ is the norm over
  *all* trainable parameters of the model: one reweighted matmul Σ_{b,t} (c_b g_{b,t}) x_{b,t}ᵀ for
  ghost layers (the "book-keeping" trick), Σ_b c_b ∇W_b for materialised ones.

Layers with identical shapes (e.g. the same projection in every transformer block) are processed as
one group: their per-sample gradients share one buffer, so norms and clipped sums cost one kernel per
group rather than a few per layer.

Assumptions (checked where possible): every trainable parameter belongs to a module with a rule
(``nn.Linear``; anything else is refused, never silently skipped); dimension 0 of each layer's input is
the sample; samples do not interact in the forward pass (true for transformers without batch norm);
no activation checkpointing (a recomputed forward would be captured twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

NormMethod = Literal["auto", "ghost", "materialise"]
NORM_METHODS: tuple[str, ...] = ("auto", "ghost", "materialise")
CLIP_EPS = 1e-6


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-sample clip factors min(1, C/(‖g‖ + 1e-6)) for gradient L2 norms ``norms``. The one clipping
    rule of DP-SGD here: records (:meth:`PerSampleGradients.clip`) and audit canaries (gradient and
    sketch canaries) alike go through it, so a clipping bug hits both."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm: must be > 0, got {clip_norm!r}")
    return (clip_norm / (norms + CLIP_EPS)).clamp(max=1.0)


# ----------------------------------------------------------------------------------------------
# layer rules
# ----------------------------------------------------------------------------------------------
class LayerRule:
    """How one module type turns captured (input, output-gradient) pairs into per-sample quantities.

    Rules work on a *group* of L layers with identical shapes at once (fewer kernels): ``xs``: L
    inputs of shape (B, T, d_in), ``gs``: L output-gradients (B, T, d_out) (calls of the same module in
    one forward pass are concatenated along T). ``attrs``: the module's trainable parameter names.
    """

    def sq_norms(self, xs: list[torch.Tensor], gs: list[torch.Tensor], attrs: tuple[str, ...],
                 method: NormMethod, state: dict[str, Any]) -> torch.Tensor:
        """Per-sample squared norms summed over the group, (B,); may leave reusable tensors in ``state``."""
        raise NotImplementedError

    def clipped_sum(self, xs: list[torch.Tensor], gs: list[torch.Tensor], attrs: tuple[str, ...],
                    factors: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Σ_b factors_b ∇_b for each attr, shape (L, *param.shape)."""
        raise NotImplementedError


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_rule(module_type: type[nn.Module]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: register the per-sample rule for ``module_type`` (exact type or a subclass)."""

    def deco(cls: type[LayerRule]) -> type[LayerRule]:
        _RULES[module_type] = cls()
        return cls

    return deco


def rule_for(module: nn.Module) -> LayerRule | None:
    for mtype in type(module).__mro__:
        if mtype in _RULES:
            return _RULES[mtype]
    return None


def choose_norm_method(tokens: int, d_in: int, d_out: int, method: NormMethod = "auto") -> str:
    """``ghost`` or ``materialise`` for a layer seeing ``tokens`` positions per sample."""
    if method != "auto":
        return method
    cheaper_memory = tokens * tokens < d_in * d_out
    cheaper_time = tokens * (d_in + d_out) < d_in * d_out
    return "ghost" if (cheaper_memory and cheaper_time) else "materialise"


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """``nn.Linear`` (LoRA A and B factors, classification heads).

    Materialised per-sample gradients of a group are written into one (L, B, d_out, d_in) buffer (no
    copy of the large inputs), so norms and the clipped sum are one kernel each for the whole group.
    """

    def sq_norms(self, xs: list[torch.Tensor], gs: list[torch.Tensor], attrs: tuple[str, ...],
                 method: NormMethod, state: dict[str, Any]) -> torch.Tensor:
        batch, tokens, d_in = xs[0].shape
        d_out = gs[0].shape[-1]
        g0 = gs[0]
        out = torch.zeros(batch, dtype=g0.dtype, device=g0.device)
        if "weight" in attrs:
            how = choose_norm_method(tokens, d_in, d_out, method)
            state["how"] = how
            if how == "ghost":
                for x, g in zip(xs, gs):
                    if tokens == 1:
                        out += x[:, 0].square().sum(-1) * g[:, 0].square().sum(-1)
                    else:
                        gram_x = torch.bmm(x, x.transpose(1, 2))
                        gram_g = torch.bmm(g, g.transpose(1, 2))
                        out += (gram_x * gram_g).sum(dim=(1, 2))
            else:
                buf = torch.empty(len(xs), batch, d_out, d_in, dtype=g0.dtype, device=g0.device)
                for i, (x, g) in enumerate(zip(xs, gs)):
                    torch.bmm(g.transpose(1, 2), x, out=buf[i])
                state["weight"] = buf
                out += buf.view(len(xs), batch, -1).square().sum(dim=(0, 2))
        if "bias" in attrs:
            gb = torch.stack([g.sum(dim=1) for g in gs])  # (L, B, d_out)
            state["bias"] = gb
            out += gb.square().sum(dim=(0, 2))
        return out

    def clipped_sum(self, xs: list[torch.Tensor], gs: list[torch.Tensor], attrs: tuple[str, ...],
                    factors: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch, tokens, d_in = xs[0].shape
        d_out = gs[0].shape[-1]
        res: dict[str, torch.Tensor] = {}
        if "weight" in attrs:
            if "weight" in state:  # materialised: Σ_b c_b ∇W_b, one matmul for the group
                per = state["weight"].view(len(xs), batch, d_out * d_in)
                res["weight"] = torch.matmul(factors, per).view(len(xs), d_out, d_in)
            else:  # book-keeping: Σ_{b,t} (c_b g_bt) x_btᵀ
                res["weight"] = torch.stack([
                    (g * factors[:, None, None]).reshape(-1, d_out).t().mm(x.reshape(-1, d_in))
                    for x, g in zip(xs, gs)
                ])
        if "bias" in attrs:
            res["bias"] = torch.matmul(factors, state["bias"])
        return res


# ----------------------------------------------------------------------------------------------
# the hook manager
# ----------------------------------------------------------------------------------------------
@dataclass
class _Capture:
    name: str
    module: nn.Module
    rule: LayerRule
    params: dict[str, str]  # attribute ("weight"/"bias") -> full parameter name
    xs: list[torch.Tensor] = field(default_factory=list)
    gs: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def attrs(self) -> tuple[str, ...]:
        return tuple(sorted(self.params))

    def reset(self) -> None:
        self.xs.clear()
        self.gs.clear()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, g) as (B, T, d), calls concatenated along T; None if the module was not used."""
        pairs = [(self.xs[i], self.gs[i]) for i in range(len(self.xs)) if i in self.gs]
        if not pairs:
            return None
        xs = [x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in pairs]
        gs = [g.reshape(g.shape[0], -1, g.shape[-1]) for _, g in pairs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        g = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
        return x.to(g.dtype), g


@dataclass
class _Group:
    captures: list[_Capture]
    xs: list[torch.Tensor]  # L x (B, T, d_in)
    gs: list[torch.Tensor]  # L x (B, T, d_out)
    state: dict[str, Any]


@dataclass(frozen=True)
class ClippedBatch:
    """The result of one physical batch: per-sample norms (before clipping), clip factors, and the
    clipped per-parameter sum (keys: parameter names as in ``model.named_parameters()``)."""

    norms: torch.Tensor
    factors: torch.Tensor
    grads: dict[str, torch.Tensor]


class PerSampleGradients:
    """Per-sample gradient machinery for every trainable parameter of ``model``.

    Usage, per physical batch::

        psg.reset()
        loss = per_sample_losses.sum()   # NOT the mean: g must be the per-sample gradient
        loss.backward()
        out = psg.clip(clip_norm)        # norms, factors, clipped sums

    Raises ``ValueError`` at construction if a trainable parameter has no rule.
    """

    def __init__(self, model: nn.Module, norm_method: NormMethod = "auto") -> None:
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method: must be one of {NORM_METHODS}, got {norm_method!r}")
        self.norm_method: NormMethod = norm_method
        self.enabled = True
        self._captures: list[_Capture] = []
        self._cache: tuple[torch.Tensor, list[_Group]] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        covered: set[str] = set()
        owner: dict[int, str] = {}
        for mname, module in model.named_modules():
            own = {a: p for a, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            for a, p in own.items():  # a parameter shared by two modules: per-layer norms would be wrong
                full = f"{mname}.{a}" if mname else a
                if id(p) in owner:
                    raise ValueError(f"trainable parameter {full}: shared with {owner[id(p)]}; per-sample "
                                     "gradients of shared (tied) trainable parameters are not supported")
                owner[id(p)] = full
            rule = rule_for(module)
            names = {a: f"{mname}.{a}" if mname else a for a in own}
            if rule is None:
                first = next(iter(names.values()))
                raise ValueError(
                    f"trainable parameter {first}: no per-sample gradient rule for "
                    f"{type(module).__name__} (supported: {', '.join(t.__name__ for t in _RULES)})"
                )
            cap = _Capture(mname, module, rule, names)
            self._captures.append(cap)
            covered.update(names.values())
            self._handles.append(module.register_forward_hook(self._make_hook(cap)))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = trainable - covered
        if missing:  # e.g. a shared parameter registered under a module without a rule
            raise ValueError(f"trainable parameter {sorted(missing)[0]}: not covered by a per-sample rule")
        self.parameter_names: list[str] = [n for n, p in model.named_parameters() if p.requires_grad]

    def _make_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not self.enabled or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                return
            if not out.requires_grad:
                return
            if not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"per-sample gradients: {cap.name} was called without a positional input")
            idx = len(cap.xs)
            cap.xs.append(args[0].detach())

            def grad_hook(g: torch.Tensor, idx: int = idx) -> None:
                cap.gs[idx] = g.detach()
                self._cache = None

            out.register_hook(grad_hook)

        return hook

    def reset(self) -> None:
        self._cache = None
        for cap in self._captures:
            cap.reset()

    def remove(self) -> None:
        """Detach all hooks (the model is left as it was)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> "PerSampleGradients":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- after backward --------------------------------------------------------------------------
    def _compute(self) -> tuple[torch.Tensor, list[_Group]]:
        """Group captured layers by (rule, trainable attrs, shapes, dtype) and compute the squared
        per-sample norms once per backward pass."""
        if self._cache is not None:
            return self._cache
        grouped: dict[tuple[Any, ...], list[tuple[_Capture, torch.Tensor, torch.Tensor]]] = {}
        for cap in self._captures:
            xg = cap.stacked()
            if xg is None:
                continue
            x, g = xg
            key = (id(cap.rule), cap.attrs, tuple(x.shape), tuple(g.shape), x.dtype, g.dtype, x.device)
            grouped.setdefault(key, []).append((cap, x, g))
        if not grouped:
            raise RuntimeError("per-sample gradients: nothing captured (call backward on the summed loss)")
        batch_sizes = {key[2][0] for key in grouped}
        if len(batch_sizes) > 1:
            raise RuntimeError(f"per-sample gradients: layers saw different batch sizes {sorted(batch_sizes)}")
        groups: list[_Group] = []
        total: torch.Tensor | None = None
        for members in grouped.values():
            caps = [m[0] for m in members]
            grp = _Group(caps, [m[1] for m in members], [m[2] for m in members], {})
            sq = caps[0].rule.sq_norms(grp.xs, grp.gs, caps[0].attrs, self.norm_method, grp.state)
            total = sq if total is None else total + sq.to(total.dtype)
            groups.append(grp)
        assert total is not None
        self._cache = (total, groups)
        return self._cache

    def sq_norms(self) -> torch.Tensor:
        """Squared per-sample gradient norms over all trainable parameters, shape (B,)."""
        return self._compute()[0]

    def clip(self, clip_norm: float) -> ClippedBatch:
        """Per-sample norms, clip factors min(1, C/(‖g‖+1e-6)) (:func:`clip_factors`) and the clipped
        sum of every trainable parameter (zeros for parameters the batch did not reach)."""
        norms = self.sq_norms().sqrt()
        factors = clip_factors(norms, clip_norm)
        return ClippedBatch(norms, factors, self.weighted_sum(factors))

    def weighted_sum(self, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_b factors_b ∇_b for every trainable parameter."""
        _, groups = self._compute()
        grads: dict[str, torch.Tensor] = {}
        for grp in groups:
            rule = grp.captures[0].rule
            sums = rule.clipped_sum(grp.xs, grp.gs, grp.captures[0].attrs, factors.to(grp.gs[0].dtype), grp.state)
            for i, cap in enumerate(grp.captures):
                for attr, pname in cap.params.items():
                    grads[pname] = sums[attr][i].to(getattr(cap.module, attr).dtype)
        for cap in self._captures:  # layers the batch did not reach
            for attr, pname in cap.params.items():
                if pname not in grads:
                    grads[pname] = torch.zeros_like(getattr(cap.module, attr))
        return grads

    def per_sample_grads(self) -> dict[str, torch.Tensor]:
        """Materialised per-sample gradients (B, *param.shape) — for tests and small models only."""
        grads: dict[str, torch.Tensor] = {}
        for cap in self._captures:
            xg = cap.stacked()
            for attr, pname in cap.params.items():
                p = getattr(cap.module, attr)
                if xg is None:
                    continue
                x, g = xg
                if attr == "weight":
                    grads[pname] = torch.einsum("bto,bti->boi", g, x).to(p.dtype)
                else:
                    grads[pname] = g.sum(dim=1).to(p.dtype)
        return grads
