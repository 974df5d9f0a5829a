"""The one error type of the converter: the message says what is wrong, where, and what to do."""


class ConversionError(ValueError):
    pass
