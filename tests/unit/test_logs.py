"""The command line's logging: records written by a background thread, every one on stderr by exit."""
import subprocess
import sys

_PROGRAM = """
import logging
from pdserve import logs
logs.configure()
log = logging.getLogger("pdserve.x")
args = [1]
log.info("request %s finished", args)
args.append(2)          # a later change to an argument does not change the line
log.debug("not at info level")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
for i in range(500):
    log.info("line %d", i)
print("stdout stays clean")
"""


def test_every_record_reaches_stderr_formatted_by_exit():
    done = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stdout stays clean\n"
    lines = done.stderr.splitlines()
    assert any(line.endswith("INFO pdserve.x: request [1] finished") for line in lines)
    assert not any("not at info level" in line for line in lines)
    boom = next(i for i, line in enumerate(lines) if line.endswith("ERROR pdserve.x: boom"))
    assert lines[boom + 1] == "Traceback (most recent call last):" and "ZeroDivisionError" in done.stderr
    assert lines[-1].endswith("INFO pdserve.x: line 499")     # the listener is flushed at exit


def test_configure_leaves_a_configured_root_logger_alone():
    program = ("import logging, sys\nlogging.basicConfig(stream=sys.stdout, format='%(message)s')\n"
               "from pdserve import logs\nlogs.configure()\nlogging.getLogger().warning('once')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout == "once\n" and done.stderr == ""
