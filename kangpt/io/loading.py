"""Load a model folder (``save_pretrained`` output, e.g. ``OUT_DIR/model``) or a hub model, with its
tokenizer: the one loader behind ``kangpt generate`` and ``kangpt inspect``."""

from __future__ import annotations

from pathlib import Path

import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..messages import first_line


class ModelFolderError(ValueError):
    """A model folder or hub name that cannot be loaded; the message says why, in one line."""


def load_model(name: str, device: str = "cpu", *, hub: bool = True):
    """``(tokenizer, model)`` of model folder ``name`` (or, with ``hub``, of a hub model of that name),
    the model on ``device`` in eval mode. Raises :class:`ModelFolderError` for what cannot load."""
    folder = Path(name).expanduser()
    looks_local = not hub or name.startswith((".", "/", "~")) or name.count("/") > 1  # hub: "org/name"
    if looks_local and not folder.is_dir():
        raise ModelFolderError(f"no such model folder: {name!r}")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelFolderError(f"{name!r} is not a model folder (no config.json)")
    source = str(folder) if folder.is_dir() else name
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source)  # first: a bad config is told before the tokenizer warns
        model = AutoModelForCausalLM.from_pretrained(source, config=config)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except SafetensorError as err:  # a truncated or damaged weights file
        damaged = f"cannot load {name!r}: a weights file is damaged ({first_line(err)})"
        raise ModelFolderError(damaged) from err
    except (OSError, ValueError, StrictDataclassError) as err:  # missing files, no hub, a bad config
        if not folder.is_dir():  # "org/name" was neither a folder here nor a model the hub gave
            raise ModelFolderError(
                f"no such model folder: {name!r}, and no hub model of that name loaded ({first_line(err)})"
            ) from err
        raise ModelFolderError(f"cannot load {name!r}: {first_line(err)}") from err
    return tokenizer, model.to(device).eval()
