"""What an SAE is, how its files look, and what is known about its features."""

from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.sae.formats import load_sae, save_sae
from sae_serve.sae.model import SaeConfig, SparseAutoencoder, build_sae

__all__ = ["FeatureCatalog", "FeatureInfo", "SaeConfig", "SparseAutoencoder", "build_sae", "load_sae", "save_sae"]
