"""Test helper: record which generators a mechanism's noise, secrets and sampling come from."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from privaudit.mechanisms import rng, sampling


def _guarded_torch_generator(real: Any) -> type:
    """A stand-in for ``torch.Generator`` that refuses to be built by mechanism code
    (``privaudit/mechanisms/``); public initialisations elsewhere (e.g. a LoRA init from
    ``training.seed``) still get a real one, and ``isinstance`` checks still work."""

    class Guard(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/privaudit/mechanisms/" in caller:
                raise AssertionError(f"a torch.Generator (a PRNG) was built by {caller} during a secure run")
            return real(*args, **kwargs)

        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, real)

    return Guard("Generator", (), {})


def spy_generators(monkeypatch: pytest.MonkeyPatch, *, forbid_torch_generator: bool = True) -> list[str]:
    """From now on (until the test ends) record the type name of the generator behind every
    ``rng.randn`` / ``rng.rand`` draw and every sampler's generator (``sampling.sampling_rng``). With
    ``forbid_torch_generator``, mechanism code that builds a ``torch.Generator`` raises."""
    seen: list[str] = []
    orig_randn, orig_rand, orig_sampling = rng.randn, rng.rand, sampling.sampling_rng

    def randn(*size: Any, generator: Any = None, **kw: Any) -> torch.Tensor:
        seen.append(type(generator).__name__)
        return orig_randn(*size, generator=generator, **kw)

    def rand(*size: Any, generator: Any = None, **kw: Any) -> torch.Tensor:
        seen.append(type(generator).__name__)
        return orig_rand(*size, generator=generator, **kw)

    def sampling_rng(seed: int | None) -> Any:
        g = orig_sampling(seed)
        seen.append(type(g).__name__)
        return g

    monkeypatch.setattr(rng, "randn", randn)
    monkeypatch.setattr(rng, "rand", rand)
    monkeypatch.setattr(sampling, "sampling_rng", sampling_rng)
    if forbid_torch_generator:
        monkeypatch.setattr(torch, "Generator", _guarded_torch_generator(torch.Generator))
    return seen
