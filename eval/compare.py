"""KAN-GPT-2 side by side with the original GPT-2: parameters, memory and speed.

The program lives in ``kangpt/commands/compare.py`` so that the ``kangpt compare`` console command runs it
too; see that module's docstring, or ``python eval/compare.py --help``. Examples::

    python eval/compare.py                      # GPT-2 small..XL parameters; "mini" memory and speed on CPU
    python eval/compare.py --size small --device cuda --dtype bf16 --batch 8 --seq-len 1024
"""

import sys

from kangpt.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
