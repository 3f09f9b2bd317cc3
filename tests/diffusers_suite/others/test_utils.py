"""What diffusers' scheduler tests import from `tests/others/test_utils.py`: the Hub staging tests are skipped here
(no network)."""

import unittest

USER = "__DUMMY_TRANSFORMERS_USER__"
TOKEN = "hf_dummy"


def is_staging_test(test_case):
    return unittest.skip("Hub staging tests need the network")(test_case)
