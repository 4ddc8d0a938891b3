"""For mutation runs only (``scripts/mutate.py`` lists this file first among a target's tests;
pytest does not collect it otherwise: its name does not start with ``test_``).

mutmut 3 first runs the tests once with ``MUTANT_UNDER_TEST=stats`` to learn which tests call
which function. Tests that start ``repvgg`` in a subprocess (``tests/test_writes.py``'s signal
tests) pass their environment on, and in the subprocess mutmut's trampoline then tries to
record the call: it reads mutmut's configuration from the subprocess's working folder, finds
none, and the subprocess dies ("Could not figure out where the code to mutate is"), so the stats
run fails and mutmut stops before the first mutant.

mutmut keeps the mode in a process-local copy as well as in the environment (``mutmut.mutation
.trampoline.set_mutant_under_test``; the environment only wins when the key is there). So in the
stats run, and only there, the key is taken out of the environment: this process still records
its calls (from the process-local copy), and subprocesses run the original code. When a mutant
is tested, the key (the mutant's name) stays, and subprocesses run the mutant as the tests do.
"""

from __future__ import annotations

import os

try:
    from mutmut.mutation import trampoline
except ImportError:  # not a mutation run
    trampoline = None

if (trampoline is not None and os.environ.get("MUTANT_UNDER_TEST") == "stats"
        and getattr(trampoline, "_mutant_under_test", None) == "stats"):
    del os.environ["MUTANT_UNDER_TEST"]
