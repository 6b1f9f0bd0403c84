"""Preemption: SIGTERM/SIGINT save a checkpoint at the next step boundary, then exit."""

from __future__ import annotations

import os
import signal
import sys
import threading

from jaxmint.checkpoint import Preempted


class Preemption:
    """Signal handlers of a run with checkpoints.

    After the first SIGTERM or SIGINT, `signal` holds its name; the loop then
    saves and calls `exit`. A second SIGINT exits at once (code 130).
    """

    def __init__(self):
        self.signal: str | None = None
        self._old_handlers: dict = {}
        self._wakeup_fds = None

    def install(self) -> None:
        """SIGTERM/SIGINT: save at the next step boundary; a second SIGINT exits at once."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            del frame
            if self.signal and signum == signal.SIGINT:
                os.write(2, b"\nsecond interrupt: exiting now without saving\n")
                os._exit(130)
            self.signal = signal.Signals(signum).name
            os.write(2, f"\n{self.signal}: saving a checkpoint at the next step\n".encode())

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)
        self._watch_second_interrupt()

    def _watch_second_interrupt(self) -> None:
        """Exit on a second SIGINT even while the main thread is stuck in C code.

        Python runs signal handlers in the main thread between bytecodes, so during
        a long compile or a blocking call the handler above would wait. The C-level
        handler also writes the signal number to a wakeup pipe at once; this thread
        reads it and exits the process on the second SIGINT.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(write_fd)
        except ValueError:  # not the main thread of the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup_fds = (read_fd, write_fd)

        def watch():
            interrupts = 0
            while True:
                try:
                    data = os.read(read_fd, 64)
                except OSError:
                    return
                if not data:  # restore_signal_handlers closed the write end
                    os.close(read_fd)
                    return
                interrupts += data.count(bytes([signal.SIGINT]))
                if interrupts >= 2:
                    os.write(2, b"\nsecond interrupt: exiting now without saving\n")
                    os._exit(130)

        threading.Thread(target=watch, daemon=True, name="jaxmint-interrupts").start()

    def uninstall(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}
        fds = getattr(self, "_wakeup_fds", None)
        if fds is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            os.close(fds[1])  # the watcher reads EOF and ends
            self._wakeup_fds = None

    def exit(self, step: int, directory) -> None:
        """Raise `Preempted` (exit code 128 + signal) after saying how to resume."""
        code = 128 + signal.Signals[self.signal].value  # 143 for SIGTERM, 130 for SIGINT
        print(
            f"{self.signal}: saved a checkpoint at step {step} in {directory}. "
            "Run the same command again (same --workdir) to resume.",
            file=sys.stderr,
            flush=True,
        )
        raise Preempted(code)
