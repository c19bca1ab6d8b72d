"""sae_serve: production feature steering for LLM inference."""

from sae_serve.sae import FeatureCatalog, SaeConfig, SparseAutoencoder, load_sae, save_sae

__all__ = ["FeatureCatalog", "SaeConfig", "SparseAutoencoder", "load_sae", "save_sae"]
__version__ = "0.1.0"
