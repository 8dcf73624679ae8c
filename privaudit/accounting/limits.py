"""Documented input limits of the accountants and calibration (steps, target ε, δ), shared with configs and
the CLI.
"""

from __future__ import annotations

MAX_STEPS = 10**9  #: training steps (also the limit of ``privaudit epsilon/calibrate --steps``)

MAX_TARGET_EPSILON = 1000.0  #: largest target ε to calibrate to

MIN_DELTA = 1e-100  #: smallest δ (below it the accountants' floating point breaks down)
