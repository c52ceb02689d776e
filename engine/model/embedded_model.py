"""Where the embedded default model lives: engine/model/embedded/, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
REQUIRED_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards


def default_model_path() -> Path | None:
    """The embedded checkpoint folder, or None when this install carries no trained model."""
    if all((EMBEDDED_DIR / name).is_file() for name in REQUIRED_FILES) and any(
            (EMBEDDED_DIR / name).is_file() for name in WEIGHT_FILES):
        return EMBEDDED_DIR
    return None
