"""The commands' own error: a problem with a command's arguments."""


class CommandError(Exception):
    """A problem with the command's input, reported as ``error: <message>`` and exit code 1."""
