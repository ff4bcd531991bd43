"""common/files.deferred_signals: a signal that arrives inside the block is delivered when the block ends."""

import os
import signal
import threading
import time

import pytest

from sparsedeploy.common.files import deferred_signals


def test_ctrl_c_inside_the_block_is_delivered_after_it():
    steps = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # without the hold, KeyboardInterrupt is raised here
        steps.append("recorded")
    assert steps == ["recorded"]


def test_without_the_hold_ctrl_c_cuts_the_steps():
    """The control: the same steps, unheld, are cut where the signal lands."""
    steps = []
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        steps.append("recorded")
    assert steps == []


def test_off_the_main_thread_it_holds_nothing_and_breaks_nothing():
    ran = []

    def work():
        with deferred_signals():
            ran.append(True)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert ran == [True]
