"""Progress display: a tqdm bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

from evomerge.progress import show_progress

SCRIPT = "from evomerge.progress import show_progress\nfor _ in show_progress(iter(range(3)), 3, 'merges'):\n    pass\n"


def test_progress_bar_on_terminal():
    controller, terminal = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm fits its bar to that.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    completed = subprocess.run([sys.executable, "-c", SCRIPT], stdout=terminal, stderr=terminal, timeout=60)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO once the child's side is closed and drained
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)

    assert completed.returncode == 0
    text = output.decode(errors="replace")
    assert "merges" in text
    assert "0/3" in text  # the bar with its total; a fast loop ends before the next refresh


def test_progress_logs_without_terminal(caplog):
    caplog.set_level(logging.INFO, logger="evomerge.progress")
    items = list(show_progress(iter(["a", "b"]), 2, "evaluations"))

    assert items == ["a", "b"]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["evaluations: 1/2 done", "evaluations: 2/2 done"]
