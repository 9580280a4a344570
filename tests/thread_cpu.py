"""CPU seconds spent by given threads: idle-spin tests measure only the threads under test.

``time.process_time()`` counts every thread of the process, so threads an earlier test left running (a daemon
still winding down) can fail an idle check that has nothing to do with them.
"""

import threading
import time


def cpu_seconds(threads: list[threading.Thread]) -> float:
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads if t.is_alive())
