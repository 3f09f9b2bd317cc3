"""What diffusers' scheduler tests import from their `tests/testing_utils.py` (CPU only here)."""

import logging
from io import StringIO

torch_device = "cpu"


class CaptureLogger:
    """Capture a logger's output (diffusers' own helper, verbatim behaviour)."""

    def __init__(self, logger):
        self.logger = logger
        self.io = StringIO()
        self.sh = logging.StreamHandler(self.io)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.sh)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.sh)
        self.out = self.io.getvalue()

    def __repr__(self):
        return f"captured: {self.out}\n"
