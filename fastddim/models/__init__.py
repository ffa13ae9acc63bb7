"""Models shipped inside the fastddim package.

The only one today is ``digits``: a small diffusers ``UNet2DModel`` trained by
:mod:`fastddim.train_digits` on scikit-learn's bundled 8x8 handwritten digits. It is
stored as a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``),
so ``diffusers.DDIMPipeline.from_pretrained(default_model_dir())`` loads it as is.
"""

from __future__ import annotations

import pathlib

__all__ = ["DEFAULT_MODEL_DIR", "default_model_dir"]

DEFAULT_MODEL_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "digits"


def default_model_dir() -> pathlib.Path:
    """Return the folder of the embedded default model.

    Returns:
        Path of the diffusers pipeline folder holding the digits model (``model_index.json``,
        ``unet/`` and ``scheduler/``).

    Raises:
        FileNotFoundError: If the model files are missing, e.g. a source checkout where the
            model was deleted or a wheel built without package data.
    """
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"embedded model not found at {DEFAULT_MODEL_DIR}; regenerate it with `python -m fastddim.train_digits`"
        )
    return DEFAULT_MODEL_DIR
