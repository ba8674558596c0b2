"""The one exception type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class DifflmError(Exception):
    """Bad input from the user (a path, a config value, a model directory); the message names the fix."""
