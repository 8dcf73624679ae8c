"""HE-LoRA: base-model products on GLWE-encrypted activations (mechanism, HE backend, worker)."""
