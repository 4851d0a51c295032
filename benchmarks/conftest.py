"""`pytest benchmarks/` runs under the speed report's settings (timing.report_settings: every
compile is a compile, TF32 off for fp32)."""
import pytest

from mpvit_kernels.bench.timing import report_settings


@pytest.fixture(autouse=True, scope="session")
def _report_settings():
    with report_settings():
        yield
