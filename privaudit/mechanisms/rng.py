"""Where DP noise and secret sampling get their randomness: one factory for every mechanism.

Default (``noise_seed`` unset): a cryptographically secure generator. Secret randomness (DP noise,
Poisson sampling, secret sketches) must be unpredictable to the adversary; torch's and numpy's
PRNGs (Philox/Mersenne/PCG64) are fast but not cryptographic: whoever learns part of their output or
state can predict the rest. A ``noise_seed`` makes a run reproducible (tests, CI) and is recorded in
the ledger header as ``noise_secure: false``.
"""

from __future__ import annotations

from typing import Any

SECURE_SOURCE = "csprng: AES-256-CTR keyed from os.urandom"
SEEDED_SOURCE = "seeded from privacy.noise_seed: reproducible, NOT SECURE"


def describe_noise_source(noise_seed: int | None) -> dict[str, Any]:
    """Ledger-header fields naming the noise source for a run with this ``noise_seed``."""
    if noise_seed is None:
        return {"noise_source": SECURE_SOURCE, "noise_secure": True}
    return {"noise_source": SEEDED_SOURCE, "noise_secure": False}
