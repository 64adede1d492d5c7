"""User-facing errors. Every subsystem raises these (or subclasses) for bad input so the
command line can print the message without a traceback. They subclass ValueError so that
Python users can catch them the ordinary way."""


class BunnyError(ValueError):
    """Bad input: the message names the input at fault and what is wrong with it."""
