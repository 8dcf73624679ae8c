"""PAE MobiLLM: server-assisted side-tuning (mechanism, side network, transport)."""
