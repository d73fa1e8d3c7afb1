"""Worker-side tools of prefix-router: the vLLM simulator (`worker.sim`) and, later, the real
vLLM launcher and the KV-event sidecar. Entry point: ``prefix-worker`` (`worker.cli`)."""
