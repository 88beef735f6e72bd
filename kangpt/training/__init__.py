"""Training a KAN-GPT-2: the run config (``run_config``), the run folder (``run_dir``), the loop
(``loop``), the launch checks (``launch``), the loss on held-out blocks (``evaluation``) and the
model card and loss chart of a finished run (``report``)."""

from .evaluation import validation_loss
from .loop import train
from .run_config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "load_config", "train", "validation_loss"]
