"""Train KAN-GPT-2: ``python train.py [CONFIG.yaml] [--section.key=value ...]``.

Without CONFIG it trains ``configs/default.yaml``, a small model on the Python standard library
that finishes in minutes on a laptop CPU. Works the same under ``accelerate launch`` and
``torchrun``. See ``kangpt/run_config.py`` for the keys and ``kangpt/training.py`` for the loop.
"""

import sys
from pathlib import Path

from kangpt.commands import main

if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "configs" / "default.yaml"
    sys.exit(main(["train", "--default-config", str(default), *sys.argv[1:]]))
