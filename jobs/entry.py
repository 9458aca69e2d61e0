"""`sdbatch`, the installed program: SIGTERM handling first, then the CLI.

Importing the CLI (torch, Ray) takes seconds. A scheduler's SIGTERM in that time must stop the
command the way it does later on, as an interrupt with a message and exit code 130.
"""
import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from jobs.cli import program
    except KeyboardInterrupt:
        sys.stderr.write("sdbatch: error: interrupted while starting; nothing was done\n")
        sys.exit(130)
    program()
