"""How an exception is told in one line: the commands' ``error: ...`` and messages that wrap another's.

Plain enough for the modelling files (``convert.py``) to import, so it travels with remote code.
"""

from huggingface_hub.errors import StrictDataclassError


def first_line(err: BaseException) -> str:
    """The first line of an error's message; of its cause for a strict dataclass's validation error
    (whose own first line only names the field)."""
    if isinstance(err, StrictDataclassError) and err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
