"""Error classes that decide the exit code: InvalidInput -> 2 (never retried); any other error -> 1,
retried (mot_operator.contract)."""


class InvalidInput(Exception):
    """Bad data, bad model, bad options: retrying cannot help. Message names the file/field."""
