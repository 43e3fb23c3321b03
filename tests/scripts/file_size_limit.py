"""Runs a module (``python file_size_limit.py BYTES -m MODULE ARGS...``) with every file it writes
capped at BYTES (``RLIMIT_FSIZE``; ``SIGXFSZ`` ignored), so a write past the cap fails with a real
``EFBIG`` from the kernel: a disk-full / I/O-error stand-in that needs no root and no small disk."""

import resource
import runpy
import signal
import sys

limit = int(sys.argv[1])
if sys.argv[2] != "-m":
    sys.exit("usage: file_size_limit.py BYTES -m MODULE [ARGS...]")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = [sys.argv[3]] + sys.argv[4:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
