"""The live heap counter of the memory benchmarks (benchmarks/heap_count.c): what it counts decides their figures."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CHILD = """
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import torch
from _record import HeapBytes

heap = HeapBytes()
before = heap.live_mib()
tensor = torch.empty(64 * 2**20, dtype=torch.uint8)
with_tensor = heap.live_mib()
del tensor
after_free = heap.live_mib()
heap.reset_peak()
# a tensor made and freed on another thread, between two reads on this one: only the peak saw it
thread = threading.Thread(target=lambda: torch.empty(32 * 2**20, dtype=torch.uint8))
thread.start()
thread.join()
print(json.dumps({"before": before, "with_tensor": with_tensor, "after_free": after_free,
                  "peak": heap.peak_mib(), "end": heap.live_mib()}))
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (apt-get install gcc)")
def test_heap_count_sees_tensors_made_and_freed_on_any_thread():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _record import heap_count_env
    finally:
        sys.path.remove(str(BENCHMARKS))
    env = dict(os.environ, **heap_count_env())
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(BENCHMARKS)], env=env, capture_output=True, text=True, check=True
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert 64 <= counts["with_tensor"] - counts["before"] < 64.5
    assert abs(counts["after_free"] - counts["before"]) < 0.5
    # the peak since the reset: the other thread's 32 MiB tensor, counted at its malloc and its free
    assert 32 <= counts["peak"] - counts["after_free"] < 32.5
    assert abs(counts["end"] - counts["before"]) < 1.0


def test_heap_bytes_refuses_a_process_without_the_counter():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _record import HeapBytes
    finally:
        sys.path.remove(str(BENCHMARKS))
    with pytest.raises(RuntimeError, match="heap_count_env"):
        HeapBytes()
