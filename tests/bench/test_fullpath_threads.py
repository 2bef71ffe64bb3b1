"""The plain parts of `bench/fullpath_threads.py`: reading /proc and naming threads."""

from __future__ import annotations

import os
import threading
import time

from bench.fullpath_threads import group, parse_dump, thread_times


def test_thread_times_counts_a_busy_thread_on_a_core() -> None:
    tid = threading.get_native_id()
    before = thread_times(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = thread_times(os.getpid())
    assert tid in before and tid in after
    ran = after[tid][0] - before[tid][0]
    assert 0.04 <= ran < 5.0
    assert after[tid][1] >= before[tid][1] >= 0.0


def test_a_py_spy_dump_names_threads_by_native_id() -> None:
    dump = (
        "Process 27046: python -m icgate.gateway.cli.main serve\n"
        "Python v3.11.7\n\n"
        'Thread 27046 (idle): "MainThread"\n'
        "    select (selectors.py:468)\n"
        'Thread 27050 (active): "icgate-embed_0"\n'
        'Thread 27051 (idle): "asyncio_3"\n'
    )
    names = parse_dump(dump)
    assert names == {27046: "MainThread", 27050: "icgate-embed_0", 27051: "asyncio_3"}
    assert [group(names.get(t)) for t in (27046, 27050, 27051, 99)] == [
        "MainThread",
        "icgate-embed_0",
        "default executor (database writes, scrubbing)",
        "native threads (onnxruntime, OpenMP, ...)",
    ]
