"""The embedded default: a tiny SD 1.5-architecture base model and a small concept dataset, both
shipped with the package, so the whole job runs on any CPU in about two minutes with no download.
Built by scripts/build_embedded_model.py; `synthetic` describes the world they come from."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = ASSETS / "tiny-sd15"
CONCEPT_DATASET = ASSETS / "concept_dataset"
RESOLUTION = 64  # the tiny model's native resolution
