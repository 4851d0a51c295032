"""`make gpu-proof` (tools/gpu_proof.sh): without a GPU it stops at once, saying why; on a GPU its
results come back whole from the device tool (at most 8 files, two folders deep, logs in one archive)."""
import importlib
import os
import stat
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_proof.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the proof would run")
def test_gpu_proof_stops_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA GPU visible" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or written


def stand_in_python(tmp_path, *cases):
    """A python that answers ``cases`` (bash case patterns and actions, first), the three device
    questions (is there a GPU, its name, its arch) and whether the checkout's extension has CUDA
    kernels (yes: built, so that no stage builds it here, whatever this torch is), and runs
    everything else for real."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'case "$*" in\n'
                    + "".join(f"  {case} ;;\n" for case in cases) +
                    "  *is_available*) exit 0 ;;\n"
                    "  *get_device_name*) echo 'Stand-in GPU'; exit 0 ;;\n"
                    "  *get_device_capability*) echo 9.0; exit 0 ;;\n"
                    "  *extension_runs_on*) exit 0 ;;\n"
                    "esac\n"
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


@pytest.mark.slow
def test_gpu_proof_results_fit_what_the_device_tool_returns(tmp_path):
    # The script's own steps on a stand-in python: a short test and bench stage, whose results
    # and logs must land as the device tool can copy them back.
    fake = stand_in_python(tmp_path)
    out_dir = tmp_path / "out"
    # the tests stage on a file of its own: outside tests/, its workers import neither our
    # conftest nor torch (7 of the stage's 12 s with a test of tests/)
    (tmp_path / "test_stand_in.py").write_text("def test_passes():\n    pass\n")
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out_dir), STAGES="tests bench model",
               TESTS=str(tmp_path / "test_stand_in.py"), TESTS_WORKERS="2", BENCH_ARGS="--ops affine_hswish --quick",
               MODEL_ARGS="--ops model --model-batch 2 --resolutions 64 --model-modes inference --no-compile --reps 1 "
                          "--warmup 0", MPVIT_KERNELS_BACKEND="reference")
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    # speedup.png where matplotlib (the bench extra) is installed: `make test` alone does not
    assert files - {"speedup.png", "model/speedup.png"} == {"logs.tar.gz", "model/results.json", "model/speed_report.md",
                                             "results.json", "speed_report.md", "summary.md"}, files
    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        log = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("gpu_proof.log"))).read().decode()
    assert "-n 2 --dist worksteal" in log, log  # the tests in xdist workers
    assert {"versions.txt", "gpu_proof.log", "pytest.log", "pytest.xml", "bench.log", "model.log"} <= names, names
    summary = (out_dir / "summary.md").read_text()
    assert "| tests | ok |" in summary and "| bench | ok |" in summary and "| model | ok |" in summary, summary
    assert "1 passed" in summary, summary
    assert "## affine_hswish" in (out_dir / "speed_report.md").read_text()
    assert "| MPViT-T | 64 | 2 | fp32 | inference | ours |" in (out_dir / "model" / "speed_report.md").read_text()


def test_gpu_proof_builds_first_on_a_bare_machine_and_skips_what_its_time_does_not_allow(tmp_path):
    # A later call may land on a fresh device machine: a stage that needs the extension builds it
    # first (here the stand-in has no CUDA kernels and its build fails, so the run stops there).
    fake = stand_in_python(tmp_path, "*extension_runs_on*) exit 1",
                           "*pip\\ install*|*build_ext*) echo 'stand-in build: refused'; exit 1")
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "bare"), STAGES="bench", BENCH_ARGS="--ops traffic")
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    summary = (tmp_path / "bare" / "summary.md").read_text()
    assert out.returncode == 1 and "the build stage first" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| build | FAILED" in summary and "| bench |" not in summary, summary
    # A stage gets what is left of TOTAL_TIMEOUT, and none under 30 s: the results are packed
    # before the device call is killed.
    env = dict(os.environ, PYTHON=str(stand_in_python(tmp_path)), OUT=str(tmp_path / "late"), STAGES="bench",
               BENCH_ARGS="--ops traffic", TOTAL_TIMEOUT="40")
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    summary = (tmp_path / "late" / "summary.md").read_text()
    assert out.returncode == 1 and "| bench | SKIPPED: no time left |" in summary, summary
    assert (tmp_path / "late" / "logs.tar.gz").exists()


def test_a_gpu_test_run_reports_its_triton_compiles_summed_over_xdist_workers(monkeypatch):
    # gpu_proof runs the GPU tests in pytest-xdist workers: each hands its counts to the
    # controller, whose summary sums them (the counts themselves are a GPU's: stand-ins here)
    from tests import conftest

    class Reporter:
        lines = []

        def write_line(self, line):
            self.lines.append(line)

    monkeypatch.setattr(conftest, "_WORKER_COUNTS", [])
    for counts in ([3, 1, {"output_kernel": [2, 1], "linear_kernel": [1, 0]}], [2, 0, {"linear_kernel": [2, 0]}]):
        node = type("Node", (), {"workeroutput": {"triton_counts": counts}})()
        conftest.pytest_testnodedown(node, None)
    conftest.pytest_terminal_summary(Reporter())
    assert Reporter.lines == ["Triton (summed over 2 xdist workers): 5 kernels compiled, 1 autotune keys tuned: "
                              "output_kernel 2 (1 keys tuned), linear_kernel 3"]
    # a worker's side: what it hands over, from every kernel module's launchers
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: True)
    importlib.import_module("mpvit_kernels.triton.linear")  # the counts need a kernel module imported

    config = type("Config", (), {"workeroutput": {}})()
    conftest.pytest_sessionfinish(type("Session", (), {"config": config})())
    compiled, tuned, per_kernel = config.workeroutput["triton_counts"]
    assert "linear_kernel" in per_kernel and compiled == sum(n for n, _ in per_kernel.values())


@pytest.mark.slow
def test_a_stage_cut_short_at_its_limit_still_reports_what_failed(tmp_path):
    # At the limit the stage gets SIGINT: pytest still prints its short summary and writes its
    # junit XML, so a tests stage that runs out of time says which tests had failed by then.
    tests = tmp_path / "test_cut_short.py"
    tests.write_text("import time\n\n"
                     "def test_fails_first():\n    assert False, 'seen before the limit'\n\n"
                     "def test_outlasts_the_limit():\n    time.sleep(60)\n")
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stand_in_python(tmp_path)), OUT=str(out_dir), STAGES="tests",
               TESTS=f"{tests} -p no:xdist", TESTS_WORKERS="0", TESTS_TIMEOUT="5")
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    summary = (out_dir / "summary.md").read_text()
    assert out.returncode == 1 and "| tests | TIMED OUT after 5s |" in summary, summary
    assert "test_cut_short.py::test_fails_first" in summary and "seen before the limit" in summary, summary
    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        xml = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("pytest.xml"))).read().decode()
    assert 'name="test_fails_first"' in xml
