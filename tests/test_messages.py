"""kangpt.messages.first_line: the one line an error is told in."""

import pytest

from kangpt.configuration_kangpt import KANGPT2Config
from kangpt.messages import first_line


def test_first_line_is_the_messages_first_line_or_the_type():
    assert first_line(OSError("no such file\n  details that follow")) == "no such file"
    assert first_line(ValueError("  \n")) == "ValueError"


def test_first_line_of_a_strict_dataclass_error_is_its_causes():
    with pytest.raises(Exception) as err:
        KANGPT2Config(n_layer="2")
    assert str(err.value).splitlines()[0] == "Validation error for field 'n_layer':"  # names only the field
    assert first_line(err.value) == "Field 'n_layer' expected int, got str (value: '2')"
