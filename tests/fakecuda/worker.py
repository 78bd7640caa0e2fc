"""A Python process with the fake CUDA driver loaded, running test bodies on request.

Started by tests/test_cuda_engine.py: `python worker.py LIB TESTS_DIR READ_FD WRITE_FD`.
The fake is loaded before anything touches CUDA, so the copy engine's
`dlopen("libcuda.so")` finds it; the pytest process itself keeps seeing "no CUDA". Each
request is `(module, function, args)`; the answer is `(status, result or traceback,
after)`, where `after` lists what the fake found wrong during the test and in the
cleanup after it (staging freed, every driver object released, no findings).
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import signal
import sys
import traceback
import warnings
from multiprocessing.connection import Connection


def main() -> None:
    lib, tests_dir, rfd, wfd = sys.argv[1:5]
    sys.path[:0] = [tests_dir, os.path.join(tests_dir, "fakecuda")]
    import fakecuda

    fake = fakecuda.load(lib)
    fake.reset()
    # As pytest is configured (pyproject.toml): warnings are errors.
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from zeroload import _core

    rx = Connection(int(rfd), writable=False)
    tx = Connection(int(wfd), readable=False)
    while True:
        try:
            module, name, args = rx.recv()
        except EOFError:
            return
        try:
            result = getattr(importlib.import_module(module), name)(*args)
            status = "ok"
        except BaseException as e:
            result = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            status = "error"
        after = fake.take_findings()
        fake.reset()  # faults, stub mode, configuration
        try:
            gc.collect()  # destinations of failed loads free their device memory
            _core.release_staging()
        except Exception as e:
            after.append(f"cleanup: release_staging raised {e!r}")
        fake.check_leaks()
        after += fake.take_findings()
        tx.send((status, result, after))


if __name__ == "__main__":
    main()
