"""CPU threading for attack runs.

Attacks are thousands of tiny double-backward passes on small images; on a
shared CPU, torch's intra-op threads mostly contend (a DLG run was ~100x
slower with 2 threads on a loaded 2-core box than with 1), so runs pin the
thread count for their duration.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
