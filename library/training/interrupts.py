"""Ctrl-C (SIGINT) and SIGTERM during a training run: stop after the current optimizer step and
save, instead of dying with nothing saved.

    with StopRequests() as stop:
        ...                        # before training: a signal raises KeyboardInterrupt here
        stop.start_training()      # from here a signal only sets stop.requested
        if stop.requested.is_set(): save, then raise Interrupted(...)

Why it is built this way (MindSpore 2.7.1 on CPU, measured):
- MindSpore does not leave Python's SIGINT handler in place: graph compiles and runs install
  their own (libmindspore_common.so's SignalGuard with DefaultIntHandler), which turns SIGINT
  into kill(getpid(), SIGTERM); with SIGTERM's default action the process then dies at once.
  MindSpore never touches SIGTERM, so handling SIGTERM as well catches Ctrl-C whichever handler
  is installed at that moment, and clusters' SIGTERM before a kill comes the same way.
- Python runs a signal's Python-level handler only once the main thread is back in the
  interpreter, which can be a minute later during a graph compile. Python's C-level handler
  also writes the signal number to the wakeup fd (signal.set_wakeup_fd) at once, so a thread
  reading that fd reacts immediately: it announces the stop and, at a second signal, exits.
"""

import os
import signal
import sys
import threading

from library.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130     # what a shell reports for a process stopped by Ctrl-C (128 + SIGINT)
# not the signal's name: MindSpore turns SIGINT into SIGTERM, so the name would mislead
STOP = "stop requested (Ctrl-C or SIGTERM)"


class Interrupted(UserError):
    """The run was stopped by a signal; the message says what was saved."""
    exit_code = EXIT_CODE
    label = "interrupted"


def _say(text):
    # from the watcher thread: logging could deadlock if the main thread holds its lock
    os.write(sys.stderr.fileno(), f"\n{text}\n".encode())


class StopRequests:
    """enabled=False changes nothing (the signals keep their handlers) and never requests a stop."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.requested = threading.Event()
        self.training = False
        self._count = 0

    def __enter__(self):
        if not self.enabled:
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)      # set_wakeup_fd's requirement
        self._previous = {s: signal.signal(s, self._in_main_thread) for s in SIGNALS}
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="stop-requests", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._write_fd)        # the watcher's read returns b"" and it ends
        self._watcher.join()
        os.close(self._read_fd)
        return False

    def start_training(self):
        """From here a signal asks for a stop at the end of the step. One that came before still
        stops the run now, in case its KeyboardInterrupt was swallowed (raised in a __del__)."""
        self.training = True
        if self.requested.is_set():
            raise KeyboardInterrupt

    def _in_main_thread(self, signum, frame):
        # The watcher has already seen this signal. Before training there is nothing to save:
        # stop where the main thread is (finally blocks remove partial files).
        if not self.training:
            raise KeyboardInterrupt

    def _watch(self):
        while True:
            data = os.read(self._read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum not in SIGNALS:   # the fd hears every signal with a Python handler
                    continue
                self._count += 1
                if self._count > 1:
                    _say(f"{STOP} again: exiting now, nothing more is saved")
                    os._exit(EXIT_CODE)
                self.requested.set()
                if self.training:
                    _say(f"{STOP}: stopping after the current step and saving (Ctrl-C again "
                         "exits at once without saving)")
                else:
                    _say(f"{STOP}: nothing is trained yet, stopping when the current operation "
                         "returns (Ctrl-C again exits at once)")
