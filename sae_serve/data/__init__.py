"""Files shipped inside the package: the default SAE for the default model, and the texts that
contrastive search uses to find its safety features."""

from pathlib import Path

DATA_DIR = Path(__file__).parent
DEFAULT_SAE_NAME = "layer15"
DEFAULT_SAE_DIR = DATA_DIR / "saes" / "smollm2-135m-instruct-layer15-jumprelu-4608"
CONTRASTIVE_DIR = DATA_DIR / "contrastive"
