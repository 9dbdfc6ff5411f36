"""The worker pool: workers start lean and do the work they are sent."""

from __future__ import annotations

import sys

from madfh_pipeline.workers import process_pool


def test_workers_do_not_rerun_the_parent_main_script() -> None:
    # ``multiprocessing`` re-runs the parent's main script in each child as ``__mp_main__`` unless told otherwise;
    # under ``kedro run`` that is the whole Kedro CLI import per worker.
    main_before = sys.modules["__main__"]
    probe = "getattr(__import__('sys').modules.get('__mp_main__'), '__file__', None) is None"
    with process_pool(2) as pool:
        futures = [pool.submit(eval, probe) for _ in range(4)]
        assert all(f.result(timeout=60) for f in futures)
        assert pool.submit(eval, "'madfh_pipeline.workers' in __import__('sys').modules").result(timeout=60)
    assert sys.modules["__main__"] is main_before
