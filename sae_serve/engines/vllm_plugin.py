"""The ``vllm.general_plugins`` entry point: SAEs beside the model, steering and readout per request.

``register()`` runs in every vLLM process. It patches both model runners so that, after the model
loads, the configured SAEs (vLLM's ``additional_config["sae_serve"]``, or the file named by
SAE_SERVE_CONFIG) are loaded and their layers wrapped (``vllm_site.py``), and installs the worker
methods the API process calls. Only specs the service signed are acted on (``protocol.py``).
"""

from __future__ import annotations

from sae_serve.errors import SaeServeError


def register() -> None:
    """Safe to call again in any process."""
    from sae_serve.engines.vllm_releases import check_release
    from sae_serve.engines.vllm_site import install_worker_methods
    from sae_serve.engines.vllm_v1 import patch_v1_runner
    from sae_serve.engines.vllm_v2 import patch_v2_runner

    check_release()
    try:
        patch_v1_runner()
        patch_v2_runner()
        install_worker_methods()
    except ImportError as exc:  # a vLLM without the V1 runner: say so, do not half-load
        raise SaeServeError(f"sae_serve needs vLLM's V1 model runner: {exc}") from exc
