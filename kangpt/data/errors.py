"""The exception of the data pipeline, which every module of ``kangpt.data`` raises."""


class DataError(ValueError):
    """Bad input to the data pipeline (missing file, unknown field, empty corpus, bad argument)."""
