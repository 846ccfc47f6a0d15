"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A data or tokenizer problem a user can fix: always one line naming the file and the problem.

    Raised before training starts (on open / build), never followed by exit() in library code.
    """
