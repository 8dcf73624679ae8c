"""PrivTune: split learning with d_χ noise on token representations (mechanism and d_χ sampler)."""
