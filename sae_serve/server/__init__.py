"""The doors users come through: the OpenAI-compatible HTTP API (a vLLM endpoint plugin) and the
``sae-serve serve`` launcher. Both sit on one service layer (service.py)."""
