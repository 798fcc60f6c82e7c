"""Shared pytest fixtures and the location of the shared test data.

Tests that read real data (the 2016 challenge maps, the ROMEO crop) find it
under ``SHARED_DATA``: ``$QSMPREP_SHARED_DATA`` if set, else ``../shared/data``
next to the repository. ``require_shared`` skips a test whose files are
missing, or fails it when ``QSMPREP_REQUIRE_DATA=1`` (for CI, where the data
must be present). docs/benchmarks.md describes both variables.
"""

import os
import signal
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("QSMPREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def require_shared(*relative_paths):
    """Paths of ``relative_paths`` under ``SHARED_DATA``; skip (or fail) if any is not a file.

    Returns a list of Paths in the order given. The skip message names every
    missing file. With the environment variable ``QSMPREP_REQUIRE_DATA=1`` a
    missing file fails the test instead of skipping it.
    """
    paths = [SHARED_DATA / p for p in relative_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        message = f"shared test data missing: {', '.join(missing)} (set QSMPREP_SHARED_DATA)"
        if os.environ.get("QSMPREP_REQUIRE_DATA") == "1":
            pytest.fail(message + "; QSMPREP_REQUIRE_DATA=1 requires it", pytrace=False)
        pytest.skip(message)
    return paths


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread: tiny convolutions are far faster so on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def fft_on_every_core():
    """Library FFTs follow scipy.fft.set_workers (one thread by default); tests use every core, as the CLIs do."""
    from scipy import fft

    from qsmprep.resources import available_cores

    with fft.set_workers(available_cores()):
        yield


@pytest.fixture
def terminal_signals():
    """SIGINT and SIGTERM as a terminal's process has them: a background job (nohup, a CI script) starts with SIGINT
    ignored, which qsmprep-train and qsmprep-simulate leave ignored, so Ctrl-C would not reach the test's run."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
