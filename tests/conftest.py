"""Shared test setup.

Tiny float64 convolutions are many times slower with several threads on a busy 2-core machine,
so the suite runs torch single-threaded; hypothesis runs derandomized and without deadlines.
"""

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")
