"""Hypothesis profiles for test_ok_rtrl.py (choose one with --hypothesis-profile), and the option
--write-conformance, which rewrites conformance.json from the module (docs/porting.md).

They are registered here, not in the test file, because pytest reads --hypothesis-profile before
it imports test modules. "ci" is the default when no profile is named (or HYPOTHESIS_PROFILE
names another). deadline=None: a Numba kernel's first call compiles for seconds.
"""
import os
import sys

from hypothesis import settings

from tools import runlib

# test_ok_rtrl.py imports the runners' library by its name from before it moved into tools/;
# until that file says `from tools import runlib` (issue 31 rewrites it), the name points here.
sys.modules.setdefault("runlib", runlib)

settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, database=None,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--write-conformance", action="store_true",
                     help="rewrite conformance.json from the module before comparing with it "
                          "(only after an intended change of the numbers: docs/porting.md)")
