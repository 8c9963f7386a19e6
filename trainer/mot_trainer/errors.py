"""Error classes that decide the exit code: InvalidInput -> 2 (never retried), others retryable."""


class InvalidInput(Exception):
    """Bad data, bad model, bad options: retrying cannot help. Message names the file/field."""


class RetryableError(Exception):
    """A transient failure (network, storage): the operator may retry the Job."""
