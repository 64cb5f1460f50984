"""`python tests/reap_faulty.py ARGS...` runs the reap CLI (as `python -m reap ARGS...`) with faults injected through
environment variables, for tests/test_faults.py (not a test module itself):

* ``REAP_SLOW_SHARD=S``: sleep S seconds before each output shard is written (a slow disk: time to send a signal, to
  start a second writer, to kill it);
* ``REAP_SLOW_LAYER=S``: sleep S seconds before each calibration layer;
* ``REAP_NO_SPACE_CHECK=1``: skip the free-space check, so that a full disk is met while writing, as when another
  program fills it during the run;
* ``REAP_MARK=PATH``: create PATH once the first shard is being written (the staging folder exists).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import reap.rewrite.surgery  # noqa: E402

if os.environ.get("REAP_SLOW_SHARD") or os.environ.get("REAP_MARK"):
    _write = reap.rewrite.surgery.write_safetensors

    def slow_write(*args, **kwargs):
        mark = os.environ.get("REAP_MARK")
        if mark and not os.path.exists(mark):
            Path(mark).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("REAP_SLOW_SHARD") or 0))
        return _write(*args, **kwargs)

    reap.rewrite.surgery.write_safetensors = slow_write

if os.environ.get("REAP_SLOW_LAYER"):
    import reap.stream.streamer

    _run_layer = reap.stream.streamer.LayerStreamer.run_layer

    def slow_layer(self, layer, *args, **kwargs):
        mark = os.environ.get("REAP_MARK")
        if mark and layer >= 1 and not os.path.exists(mark):
            Path(mark).write_text(str(os.getpid()))
        time.sleep(float(os.environ["REAP_SLOW_LAYER"]))
        return _run_layer(self, layer, *args, **kwargs)

    reap.stream.streamer.LayerStreamer.run_layer = slow_layer

if os.environ.get("REAP_NO_SPACE_CHECK"):
    reap.rewrite.surgery.check_free_space = lambda *args, **kwargs: None

from reap.cli import main  # noqa: E402

sys.argv = ["reap", *sys.argv[1:]]
main()
