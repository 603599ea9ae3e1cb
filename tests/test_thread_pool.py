"""An exception inside a CPU kernel's thread-pool task reaches the caller.

A task that throws on a worker thread used to escape the thread
(std::terminate: the whole process aborted). The pool now keeps the first
exception, skips the tasks not yet started, waits for every worker, and
rethrows on the calling thread; the next call works as before. The test hook
``_ext._parallel_for_failing_at(n, k)`` runs n tasks of which task k throws.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from kvsnap import _ext


def test_a_throwing_task_is_an_error_on_the_caller():
    assert _ext.num_threads() >= 1
    n = 4000  # enough tasks that the workers take most of them
    for fail_at in (0, 1, n // 2, n - 1):
        for _ in range(50):  # the failing task lands on the caller or on a worker
            with pytest.raises(RuntimeError, match=f"task {fail_at} failed"):
                _ext._parallel_for_failing_at(n, fail_at)
    # The pool is intact: every task runs when none fails.
    assert _ext._parallel_for_failing_at(n, -1) == n * (n - 1) // 2


def test_a_throwing_task_does_not_abort_the_process_with_many_threads():
    # In a child with 8 pool threads (more threads than this machine's cores,
    # so tasks fail on workers while the caller is still busy): an abort
    # would end it with SIGABRT instead of printing the count.
    code = textwrap.dedent("""
        from kvsnap import _ext
        failures = 0
        for k in range(300):
            try:
                _ext._parallel_for_failing_at(1000, (k * 37) % 1000)
            except RuntimeError:
                failures += 1
        print(failures, _ext.num_threads(), _ext._parallel_for_failing_at(1000, -1))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"KVSNAP_NUM_THREADS": "8", "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["300", "8", str(1000 * 999 // 2)]
