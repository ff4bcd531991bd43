"""common/files.deferred_signals: a signal that arrives inside the block is delivered when the block ends."""

import os
import signal
import threading
import time

import pytest

from sparsedeploy.common.files import deferred_signals


@pytest.fixture
def interruptible():
    """SIGINT raises KeyboardInterrupt in this test, as at a terminal, also where the test run inherited SIGINT ignored
    (started in the background of a script): Python installs its handler only for a SIGINT it did not find ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_inside_the_block_is_delivered_after_it(interruptible):
    steps = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # without the hold, KeyboardInterrupt is raised here
        steps.append("recorded")
    assert steps == ["recorded"]


def test_without_the_hold_ctrl_c_cuts_the_steps(interruptible):
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


def test_write_text_atomic_replaces_the_file_whole_or_not_at_all(tmp_path):
    from sparsedeploy.common.files import write_text_atomic

    target = tmp_path / "out" / "report.md"
    write_text_atomic(target, "old\n")  # the folder is made
    assert target.read_text() == "old\n"
    with pytest.raises(UnicodeEncodeError):  # a real failure inside the write: a lone surrogate cannot be encoded
        write_text_atomic(target, "new " * 10000 + "\ud800")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]  # the temporary file is gone
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
