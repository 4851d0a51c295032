"""The speed report runs and writes its files, and its traffic model counts what eager PyTorch
really dispatches."""
import contextlib
import datetime
import importlib.util
import json
import platform
import re
import sys

import pytest
import torch

import mpvit_kernels
from mpvit_kernels.bench import __main__ as report
from mpvit_kernels.bench import model as model_section
from mpvit_kernels.bench import timing
from mpvit_kernels.bench.plot import measured_cases
from mpvit_kernels.bench.traffic import eager_factor_attention, ours_factor_attention


def test_traffic_model_counts_eager_ops_and_beats_it_at_large_n():
    eager = eager_factor_attention(2, 64 * 64, 64, torch.bfloat16, backward=False)
    # softmax, two matmuls, the three CRPE convs, cat, mul, add, scale: every one is a kernel
    assert eager.launches >= 10 and "aten.convolution" in eager.ops and "aten._softmax" in eager.ops
    ours = ours_factor_attention(2, 64 * 64, 64, torch.bfloat16, backward=False)
    assert eager.bytes > 3.5 * sum(b for _, b in ours)  # the public op sequence moves 3.9x our bytes here
    nc_bytes = 2 * 64 * 64 * 64 * 2  # one (B, N, C) bf16 tensor
    assert sum(b for _, b in ours) >= 5 * nc_bytes  # never below the 5NC minimum


@pytest.mark.parametrize("res", [224, 512])
def test_attention_core_meets_its_traffic_budget_at_every_mpvit_s_stage(res):
    # issue 17: at most 3 forward launches, eager/ours bytes >= 4.5x at stages 1-3 and >= 3x at
    # stage 4, batch 16, bf16: the chunk partials and per-head S must stay small next to q, k, v, O
    from mpvit_kernels.bench.factor_attention import STAGES

    for stage, C, stride in STAGES:
        N = (res // stride) ** 2
        eager = eager_factor_attention(16, N, C, torch.bfloat16, backward=False)
        ours = ours_factor_attention(16, N, C, torch.bfloat16, backward=False)
        ratio = eager.bytes / sum(b for _, b in ours)
        assert len(ours) <= 3 and ratio >= (4.5 if stage < 4 else 3.0), (stage, len(ours), ratio)


def test_traffic_model_drops_the_combines_where_one_chunk_covers_a_head():
    # batch 64 with 8 heads: 512 programs without chunking, so one chunk a head at every stage
    names = [n.split(":")[0] for n, _ in ours_factor_attention(64, 56 * 56, 64, torch.bfloat16, backward=True)]
    assert not any("combine" in n for n in names) and sum("(one chunk)" in n for n in names) == 2
    names = [n.split(":")[0] for n, _ in ours_factor_attention(16, 56 * 56, 64, torch.bfloat16, backward=True)]
    assert names.count("context_combine") == names.count("grad_combine") == 1


@contextlib.contextmanager
def as_on_a_cpu():
    """The op families about as a CPU run without the interpreter has them: dwconv_bn,
    gli_projection, linear and residual_layernorm on their reference, the attention and
    affine_hswish on their C++ twins where the extension is built (affine_hswish's training
    BatchNorm then aten's). The report's shape is under test here, the kernels are in their own
    files."""
    twin = "cuda" if mpvit_kernels.extension_available() else "reference"
    with mpvit_kernels.use_backend("reference", ops=["dwconv_bn", "gli_projection", "linear", "residual_layernorm"]), \
            mpvit_kernels.use_backend(twin, ops=["factor_attention", "affine_hswish"]):
        yield


@pytest.mark.slow
def test_speed_report_runs(capsys, tmp_path, monkeypatch):
    from mpvit_kernels.bench import gli_projection

    monkeypatch.setattr(gli_projection, "AGGREGATES", gli_projection.AGGREGATES[::6])  # S stage 1, B stage 3
    with as_on_a_cpu():
        # (traffic: in test_speed_report_writes_its_files)
        assert report.main(["--ops", "affine_hswish,depthwise,dwconv_bn,gli_projection", "--device", "cpu",
                            "--batch", "1", "--reps", "1", "--warmup", "0", "--no-compile", "--resolutions", "64",
                            "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## affine_hswish" in out
    assert "## depthwise" in out and "| CPE | 64 | 1 | 1x16x16x64 |" in out
    assert "## gli_projection" in out and "| S | 64 | 1 | aggregate | 1x16x16x(4x64 -> 128) | fp32 | eval forward | ours |" in out
    assert "| B | 64 | 3 | InvRes conv2 | 1x4x4x(1x368 -> 368) | fp32 | eval forward | cuDNN + affine_hswish |" in out
    assert "## dwconv_bn" in out and "| 64 | 2 | 2 | 1x16x16x128 | fp32 | train forward+backward | ours |" in out


def test_traffic_model_of_the_depthwise_sites():
    from mpvit_kernels.bench.traffic import eager_depthwise, ours_depthwise

    for site, eager_ops in (("CPE", {"aten.convolution", "aten.add"}), ("InvRes dw", {"aten.convolution"})):
        eager = eager_depthwise(site, 2, 64, 56, torch.bfloat16)
        assert eager_ops <= set(eager.ops)
        ours = ours_depthwise(site, 2, 64, 56, torch.bfloat16)
        x_bytes = 2 * 64 * 56 * 56 * 2
        assert sum(b for _, b in ours) >= 2 * x_bytes  # x read once, y written once: never less
        assert eager.bytes > 2 * sum(b for _, b in ours)


def test_traffic_model_of_the_patch_embeddings():
    from mpvit_kernels.bench.traffic import eager_dwconv_bn, ours_dwconv_bn

    eager = eager_dwconv_bn(2, 64, 56, 1, torch.bfloat16)
    assert eager.ops.count("aten.convolution") == 2 and "aten.hardswish" in eager.ops
    ours = ours_dwconv_bn(2, 64, 56, 1, torch.bfloat16)
    x_bytes = 2 * 64 * 56 * 56 * 2
    assert 2 * x_bytes <= sum(b for _, b in ours) < eager.bytes / 3  # x read once, y written once


def test_traffic_model_of_the_gli_projection():
    from mpvit_kernels.bench.traffic import eager_gli_projection, ours_gli_projection

    eager = eager_gli_projection(2, 64, 128, 56, torch.bfloat16)
    assert {"aten.cat", "aten.convolution"} <= set(eager.ops)
    ours = ours_gli_projection(2, 64, 128, 56, torch.bfloat16)
    M = 2 * 56 * 56
    assert sum(b for _, b in ours) >= M * (4 * 64 + 128) * 2  # the inputs read once, y written once
    assert eager.bytes > 2 * sum(b for _, b in ours)


@pytest.mark.parametrize("site", ["aggregate", "InvRes conv1", "InvRes conv2"])
def test_gli_projection_columns_compute_the_same_function_at_every_site(site):
    # the section's columns are alternatives for one module: a column computing something else
    # (a Hardswish or the identity left out) would time a different op
    from mpvit_kernels.bench import gli_projection as section

    n, to_stage_out, hswish, has_residual = section.SITES[site]
    C, Cout = 8, (12 if to_stage_out else 8)
    xs, w, bn = section.aggregate_inputs(2, C, Cout, 5, torch.float32, "cpu", n)
    residual = torch.randn(2, Cout, 5, 5).contiguous(memory_format=torch.channels_last) if has_residual else None
    want = section.eager(xs, w, bn, hswish, residual)
    for fn in (section.ours, section.cudnn_affine_hswish):
        torch.testing.assert_close(fn(xs, w, bn, hswish, residual), want)
    fresh = lambda: (bn[0].clone(), bn[1].clone(), *bn[2:])  # noqa: E731 (eager's updates its running stats)
    torch.testing.assert_close(section.ours_train(xs, w, fresh(), hswish, residual),
                               section.eager_train(xs, w, fresh(), hswish, residual))
    assert not torch.equal(want, section.eager(xs, w, bn, not hswish, residual))


TINY_RUN = ["--device", "cpu", "--batch", "1", "--reps", "1", "--warmup", "0", "--no-compile", "--resolutions", "64"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(markdown: str) -> dict[str, int]:
    """Data rows of each section's tables in the printed report (headers and rules left out)."""
    counts, section = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
            counts[section] = 0
        elif section and line.startswith("|---"):
            counts[section] -= 1  # the line before it was the table's header
        elif section and line.startswith("|"):
            counts[section] += 1
    return counts


@pytest.mark.slow
def test_speed_report_writes_its_files(capsys, tmp_path):
    argv = ["--ops", "affine_hswish,factor_attention,traffic", *TINY_RUN, "--out", str(tmp_path)]
    with as_on_a_cpu():
        assert report.main(argv) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "speed_report.md").read_text() == printed
    assert printed.startswith("# mpvit-kernels speed report")
    assert "## traffic" in printed and "speedup bound" in printed

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == timing.device_name(torch.device("cpu"))
    assert results["driver"] is None and results["torch"] == torch.__version__ and results["cuda"] == torch.version.cuda
    assert "triton" in results and results["python"] == platform.python_version()
    assert datetime.datetime.fromisoformat(results["date"]).utcoffset() == datetime.timedelta(0)
    assert results["git_commit"] is None or re.fullmatch("[0-9a-f]{40}", results["git_commit"])
    assert results["argv"] == argv and results["options"]["reps"] == 1 and results["finished"]
    per_section = {}
    for row in results["rows"]:
        per_section[row["section"]] = per_section.get(row["section"], 0) + 1
    assert per_section == table_rows(printed) and set(per_section) == {"affine_hswish", "factor_attention", "traffic"}
    for row in results["rows"]:
        if row["section"] != "traffic":
            assert row["p25_ms"] <= row["median_ms"] <= row["p75_ms"] and row["reps"] == 1

    # attention's 'ours' on a CPU is the extension's C++ twin; without it the cases reach the
    # figure with eager alone, not dropped
    cases = measured_cases(results["rows"])
    attention = [c for c in cases if c["label"].startswith("factor_attention")]
    impls = {"eager", "ours"} if mpvit_kernels.extension_available() else {"eager"}
    assert len(attention) == 16 and all(set(c["impls"]) == impls for c in attention)
    assert len(cases) == 16 + 12  # affine_hswish: 4 sites x 3 modes
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    else:
        assert not (tmp_path / "speedup.png").exists()


def test_a_run_cut_short_keeps_every_row_it_measured(tmp_path, monkeypatch):
    """A GPU proof's bench stage has a time limit: rows reach results.json as they are measured,
    the GEMM and attention families first."""
    assert report.DEFAULT_OPS[:2] == ["gli_projection", "factor_attention"]
    assert sorted(report.DEFAULT_OPS) == sorted(name for name in report.SECTIONS if name != "model")
    measure, calls = timing.measure, []

    def cut_short(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("the time limit")
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(sys.modules["mpvit_kernels.bench.gli_projection"], "measure", cut_short)
    with as_on_a_cpu(), pytest.raises(KeyboardInterrupt):
        report.main(["--ops", "gli_projection", *TINY_RUN, "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["finished"] and [r["section"] for r in results["rows"]] == ["gli_projection"] * 3


def test_a_failing_family_costs_only_its_own_rows(tmp_path, monkeypatch, capsys):
    """A first GPU run may meet an error in one family: the others still run, the failing one
    keeps what it measured, the report says what failed and exits 1; in gli_projection a column
    the model does not run (TMA, cuDNN + affine_hswish) failing costs that column alone."""
    from mpvit_kernels.bench import gli_projection

    measure, calls = timing.measure, []

    def fails_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a stand-in kernel error")
        return measure(*args, **kwargs)

    monkeypatch.setattr(sys.modules["mpvit_kernels.bench.depthwise"], "measure", fails_on_the_third)
    monkeypatch.setattr(gli_projection, "AGGREGATES", gli_projection.AGGREGATES[:1])
    monkeypatch.setattr(gli_projection, "cudnn_affine_hswish", lambda *a: 1 / 0)
    monkeypatch.setenv("GIT_COMMIT", "0123abc")
    with as_on_a_cpu():
        assert report.main(["--ops", "gli_projection,depthwise,affine_hswish", *TINY_RUN, "--out", str(tmp_path)]) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["finished"] and results["git_commit"] == "0123abc"
    assert results["errors"] == ["depthwise fp32: RuntimeError: a stand-in kernel error"]
    sections = [r["section"] for r in results["rows"]]
    assert sections.count("depthwise") == 2 and sections.count("affine_hswish") > 0
    gli = [r for r in results["rows"] if r["section"] == "gli_projection"]
    assert {r["impl"] for r in gli} == {"eager", "ours", "torch.mm (pre-concatenated)"}
    assert len(gli) == 3 * 3 + 3 * 2  # 3 sites: eval eager, ours, torch.mm; train eager, ours
    out, err = capsys.readouterr()
    assert "**fp32 stopped after 2 rows: RuntimeError: a stand-in kernel error**" in out
    assert "column 'cuDNN + affine_hswish' dropped at S stage 1 aggregate eval forward: ZeroDivisionError" in err


def test_speed_report_without_matplotlib_skips_the_figure_only(capsys, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib now fails
    (tmp_path / "speedup.png").write_bytes(PNG_MAGIC)  # an earlier run's: it must not stay
    rows_json = tmp_path / "rows.json"
    with as_on_a_cpu():
        assert report.main(["--ops", "affine_hswish", *TINY_RUN, "--out", str(tmp_path), "--json", str(rows_json)]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("speedup.png skipped")]
    assert len(skipped) == 1 and "matplotlib" in skipped[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "rows.json", "speed_report.md"]
    assert (tmp_path / "speed_report.md").read_text() == captured.out
    rows = json.loads(rows_json.read_text())  # --json as before: device, torch, the rows
    assert set(rows) == {"device", "torch", "rows"} and len(rows["rows"]) == 24  # 4 sites x 3 modes x 2 impls


def test_quick_defaults_and_explicit_options_win():
    quick = report.parse_args(["--quick"], cuda=False)
    assert (quick.reps, quick.warmup, quick.dtypes, quick.resolutions, quick.traffic_resolutions) == (
        report.QUICK_REPS, report.QUICK_WARMUP, ["fp32"], [224], [224])
    assert quick.no_compile and not quick.flush_l2
    on_gpu = report.parse_args(["--quick", "--compile", "--reps", "7"], cuda=True)
    assert on_gpu.dtypes == ["bf16"] and on_gpu.resolutions == [224] and on_gpu.reps == 7
    assert not on_gpu.no_compile and on_gpu.flush_l2 and on_gpu.batch == 16
    full = report.parse_args([], cuda=True)
    assert full.reps == 20 and full.dtypes == ["bf16", "fp32"] and full.resolutions == [224, 512] and not full.no_compile
    assert not report.parse_args(["--no-flush-l2"], cuda=True).flush_l2
    with pytest.raises(SystemExit):
        report.parse_args(["--compile", "--no-compile"], cuda=False)
    # a CPU run on a machine with a GPU (the tests' runs of the report, there too) takes the CPU's defaults
    on_cpu = report.parse_args(["--device", "cpu"], cuda=True)
    assert on_cpu.device == "cpu" and on_cpu.dtypes == ["fp32"] and on_cpu.batch == 1 and not on_cpu.flush_l2
    assert full.device == "cuda" and quick.device == "cpu"
    with pytest.raises(SystemExit):
        report.parse_args(["--device", "cuda"], cuda=False)


def test_measure_times_the_first_call_on_its_own():
    calls, ticks = [], []
    timing.after_measure.append(lambda: ticks.append(1))
    try:
        t = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup=0, reps=3, flush_l2_between=True,
                           time_first_call=True)
    finally:
        timing.after_measure.pop()
    assert len(calls) == 4 and t["reps"] == 3 and t["first_call_ms"] >= 0 and ticks == [1]
    assert not t["l2_flushed"]  # a CPU has nothing to flush
    assert "first_call_ms" not in timing.measure(lambda: None, torch.device("cpu"), warmup=0, reps=1)


def test_a_gpu_timing_also_reports_the_hosts_time_for_the_call(monkeypatch):
    # On a GPU the events time the kernels; the host's own time for the call (until its last
    # launch is queued) says whether Python and launches set the pace. Stand-in events here.
    import time

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = Event.clock

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    def call():
        time.sleep(0.004)  # the host's share: 4 ms
        Event.clock += 10.0  # the GPU's: 10 ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(timing, "sync_device", lambda device: None)
    t = timing.measure(call, torch.device("cuda"), warmup=0, reps=3)
    assert t["median_ms"] == 10.0 and 4.0 <= t["host_ms"] < 10.0
    both = timing.measure_in_turns({"a": call, "b": call}, torch.device("cuda"), warmup=0, reps=2)
    assert all(4.0 <= both[k]["host_ms"] < 10.0 for k in "ab")
    assert "host_ms" not in timing.measure(call, torch.device("cpu"), warmup=0, reps=1)  # wall time is the host's
    row = {"op": "MPViT", "model": "S", "input": 224, "shape": [64, 3, 224, 224], "dtype": "bf16",
           "mode": "inference", "impl": "eager", **t, "img/s": 6400.0, "peak_mib": 1.0}
    assert "| 10.0 | 10.0-10.0 | " + f"{t['host_ms']:.1f} | 6400.0 |" in model_section.table([row])
    # the host's time differs per column: it does not split a case of the figure
    ours = {**row, "impl": "ours", "host_ms": t["host_ms"] + 1}
    assert len(measured_cases([row, ours])) == 1


def test_a_cuda_graph_column_that_fails_to_capture_costs_only_itself(monkeypatch, capsys):
    # On a GPU, inference is also replayed from CUDA graphs of eager and ours (the kernels'
    # time without the host's); a capture that fails on a first GPU run drops its column alone.
    inference_impls, fused = model_section._inference_impls, []

    def impls(args, public, ours, device):
        fused.append(ours)
        return {**inference_impls(args, public, ours, device), **dict(zip(model_section.GRAPHED, (public, ours)))}

    def capture(model, x, device, dtype):
        if model is fused[-1]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda: model(x)

    monkeypatch.setattr(model_section, "_inference_impls", impls)

    monkeypatch.setattr(model_section, "_graph_replay", capture)
    args = report.parse_args(["--model-batch", "1", "--resolutions", "32", "--reps", "1", "--warmup", "0",
                              "--no-compile", "--model-modes", "inference"], cuda=False)
    with as_on_a_cpu():
        rows = model_section.run(args, torch.device("cpu"), torch.float32, "fp32")
    assert [r["impl"] for r in rows] == ["eager", "ours", "eager + CUDA graph"]
    assert rows[-1]["peak_mib"] is None
    assert "column 'ours + CUDA graph' dropped at MPViT-T 32 batch 1: RuntimeError" in capsys.readouterr().err


def test_results_folder_is_named_after_the_device(monkeypatch):
    assert timing.device_slug(torch.device("cpu")) == f"cpu-{platform.machine().lower()}"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert timing.device_slug(torch.device("cuda")) == "nvidia-h100-80gb-hbm3"


def test_traffic_model_of_the_token_linears():
    from mpvit_kernels.bench.traffic import token_linear

    for site, eager_ops in (("norm1 + qkv", ["aten.native_layer_norm", "aten.addmm"]),
                            ("fc1 + GELU", ["aten.addmm", "aten.gelu"])):
        eager, ours = (token_linear(impl, site, 16, 3136, 64, torch.bfloat16, False) for impl in ("eager", "ours"))
        assert eager.ops == eager_ops and ours.ops == ["mpvit_kernels.linear"]
        # x read once, the hidden written once (and the small weights)
        hidden = {"norm1 + qkv": 3, "fc1 + GELU": 4}[site] * 64
        assert ours.bytes - 16 * 3136 * (64 + hidden) * 2 < 1e5
        # training: no more launches or bytes than eager, though nothing but x is kept for the backward
        eager, ours = (token_linear(impl, site, 16, 3136, 64, torch.bfloat16, True) for impl in ("eager", "ours"))
        assert ours.launches <= eager.launches and ours.bytes <= eager.bytes * 1.001
    # the block after its attention in inference: a and x read, the output written, nothing between
    eager, ours = (token_linear(impl, "block after attention", 16, 3136, 64, torch.bfloat16, False)
                   for impl in ("eager", "ours"))
    assert eager.ops == ["aten.addmm", "aten.add", "aten.native_layer_norm", "aten.addmm", "aten.gelu", "aten.addmm",
                         "aten.add"]
    assert ours.ops == ["mpvit_kernels.linear_proj_mlp"]
    assert 0 <= ours.bytes - 16 * 3136 * 64 * 3 * 2 < 1e5 and eager.bytes > 7 * ours.bytes


def test_whole_model_traffic_counts_the_public_model_against_ours():
    from mpvit_kernels.bench.traffic import eager_model, ours_model

    eager = eager_model("small", 16, 224, torch.bfloat16)
    # the public MPViT-S: about a thousand kernels and 5.3 GB in one eval forward at this size
    assert 900 < eager.launches < 1100 and 5.0e9 < eager.bytes < 5.6e9
    assert {"aten.cat", "aten.native_batch_norm", "aten.hardswish", "aten._softmax"} <= set(eager.ops)
    ours = ours_model("small", 16, 224, torch.bfloat16)
    # none of the ops our kernels fuse is left, nor any layout copy but the input's
    assert not {"aten.cat", "aten.native_batch_norm", "aten.hardswish", "aten._softmax", "aten.bmm"} & set(ours.ops)
    assert ours.ops.count("aten.clone") == 1
    # norm1 and GELU are inside the token GEMMs (ops.linear)
    assert not {"aten.native_layer_norm", "aten.gelu"} & set(ours.ops)
    # the budget: at most 0.35x the launches and 0.5x the bytes
    assert ours.launches <= 0.35 * eager.launches and ours.bytes <= 0.5 * eager.bytes


def test_saved_for_backward_counts_each_held_storage_once():
    from mpvit_kernels.bench.traffic import saved_for_backward

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x  # saves x twice: one storage

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), Square()).to("meta")
    # Linear's input (2x4), GELU's input (2x8), Square's input (2x8), fp32; the weights left out
    assert saved_for_backward(model, torch.empty(2, 4, device="meta")) == (4 * (8 + 16 + 16), 3)


def test_live_bytes_peak_counts_storages_until_nothing_holds_them():
    from mpvit_kernels.bench.traffic import LiveBytes

    live = LiveBytes()
    with live:
        x = torch.ones(256, device="meta")  # 1 KiB
        y = x * 2  # 2 KiB live
        del x
        z = y + 1  # x gone: y and z, 2 KiB
        w = z[:128].clone()  # 2.5 KiB
    assert live.peak == 2560 and y.numel() + w.numel() == 384


def test_training_step_memory_of_ours_is_within_the_memory_goal():
    from mpvit_kernels.bench.traffic import train_activations

    # the report's shape (meta tensors: a few seconds); at small inputs the grads dominate the peak
    eager, ours = (train_activations(impl, "small", 16, 224, torch.float32) for impl in ("eager", "ours"))
    # measured 0.60x, peak and saved; the GPU goal is a peak <= 0.7x eager's
    assert eager["tensors"] > 700 and ours["saved"] <= 0.65 * eager["saved"], (eager, ours)
    assert ours["peak"] <= 0.65 * eager["peak"] and eager["peak"] >= 0.9 * eager["saved"], (eager, ours)


def test_whole_model_rows(tmp_path, capsys):
    with as_on_a_cpu():
        assert report.main(["--ops", "model", "--device", "cpu", "--model-batch", "2", "--resolutions", "64",
                            "--reps", "1", "--warmup", "0", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for mode in ("inference", "train"):  # a CPU has no peak-memory counter: "-"
        for impl in ("eager", "ours"):
            assert f"| MPViT-T | 64 | 2 | fp32 | {mode} | {impl} |" in out
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["section"] == "model"]
    assert len(rows) == 4 and all(r["peak_mib"] is None and r["img/s"] > 0 for r in rows)
    cases = measured_cases(rows)  # the figure's bars: one case per mode, eager and ours side by side
    assert [(c["label"], set(c["impls"])) for c in cases] == [
        ("MPViT-T 64px fp32 inference", {"eager", "ours"}), ("MPViT-T 64px fp32 train", {"eager", "ours"})]
    args = report.parse_args(["--model-batch", "1", "--model-modes", "train", "--resolutions", "32", "--no-compile"],
                             cuda=False)
    assert model_section.run(args, torch.device("cpu"), torch.float32, "fp32") == []  # batch 1 is inference only
    # every row is handed to the report as soon as it is measured (a time-limited GPU call keeps it)
    args = report.parse_args(["--model-batch", "2", "--model-modes", "inference", "--resolutions", "32",
                              "--no-compile", "--reps", "1", "--warmup", "0"], cuda=False)
    saved = []
    args.save_partial = lambda rows: saved.append([r["impl"] for r in rows])
    with as_on_a_cpu():
        model_section.run(args, torch.device("cpu"), torch.float32, "fp32")
    assert saved == [["eager"], ["eager", "ours"]]


def test_whole_model_rows_measure_the_uncompiled_columns_first(monkeypatch):
    # whole-model compiles take minutes: a time-limited GPU call gets eager and ours of both
    # modes before any compiled column; the table still shows each mode's rows together
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)  # stand-in compiles, instant
    monkeypatch.setattr(model_section, "IN_TURNS", ())  # as on a GPU
    args = report.parse_args(["--model-batch", "2", "--resolutions", "32", "--reps", "1", "--warmup", "0"],
                             cuda=False)
    saved = []
    args.save_partial = lambda rows: saved.append((rows[-1]["mode"], rows[-1]["impl"]))
    with as_on_a_cpu():
        rows = model_section.run(args, torch.device("cpu"), torch.float32, "fp32")
    compiled = ("torch.compile", "ours + compile")
    assert saved == [(m, i) for m in ("inference", "train") for i in ("eager", "ours")] + \
        [(m, i) for m in ("inference", "train") for i in compiled]
    table = [line.split(" | ")[4:6] for line in model_section.table(rows).splitlines()[2:]]
    assert table == [[m, i] for m in ("inference", "train") for i in ("eager", "ours", *compiled)]


def test_whole_model_columns_are_timed_in_turns_on_a_cpu(monkeypatch):
    """On a CPU, whose speed drifts within a run, the columns of a mode run their repeats in
    turns after every one has warmed up: the calls interleave, and each row still has its reps."""
    calls = []

    def stand_in_compile(model, **_):
        def run(x):
            calls.append("compiled")
            return model(x)
        return run

    monkeypatch.setattr(torch, "compile", stand_in_compile)
    args = report.parse_args(["--model-batch", "2", "--model-modes", "inference", "--resolutions", "32",
                              "--reps", "3", "--warmup", "1"], cuda=False)
    with as_on_a_cpu(), RecordModels(calls):
        rows = model_section.run(args, torch.device("cpu"), torch.float32, "fp32")
    assert [r["impl"] for r in rows] == ["eager", "ours", "torch.compile", "ours + compile"]
    assert all(r["reps"] == 3 for r in rows) and all("first_call_ms" in r for r in rows[2:])
    # after the first calls and warm-ups, 3 rounds of one call each: eager, ours, eager compiled,
    # ours compiled
    assert calls[-18:] == ["public", "fused", "compiled", "public", "compiled", "fused"] * 3, calls


@contextlib.contextmanager
def RecordModels(calls):
    """Which model each forward runs: the public one or the fused one (a forward hook on each
    model class's forward), appended to ``calls``."""
    from mpvit_kernels.bench.public_mpvit import PublicStyleMPViT

    original = PublicStyleMPViT.forward

    def forward(self, x):
        fused = any(type(m).__name__ == "MHCAStage" for m in self.modules())
        calls.append("fused" if fused else "public")
        return original(self, x)

    PublicStyleMPViT.forward = forward
    try:
        yield
    finally:
        PublicStyleMPViT.forward = original


def test_whole_model_shapes_and_options():
    import argparse

    model = model_section

    def shapes(device, resolutions, batch=None):
        return model.shapes(argparse.Namespace(resolutions=resolutions, model_batch=batch), torch.device(device))

    # the end-to-end shapes on a GPU: 224 at batch 64 and 1, 512 at batch 16
    assert shapes("cuda", [224, 512]) == [(224, 64), (224, 1), (512, 16)]
    assert shapes("cpu", [224]) == [(224, 8)] and shapes("cpu", [96]) == [(96, 8)]
    assert shapes("cuda", [224, 512], batch=4) == [(224, 4), (512, 4)]
    with model._freezing(True):  # the max-autotune column of eager compiles with Inductor's freezing
        assert torch._inductor.config.freezing
    assert report.parse_args(["--model-sizes", "small", "--model-modes", "train"], cuda=True).model_sizes == ["small"]
    assert report.parse_args([], cuda=False).model_sizes == ["tiny"]
    with pytest.raises(SystemExit):
        report.parse_args(["--model-modes", "training"], cuda=False)


def test_compiled_columns():
    import argparse

    def f(x):
        return x + 1

    def g(x):
        return x * 2

    assert timing.compiled(argparse.Namespace(no_compile=True), f, g) == {}
    cols = timing.compiled(argparse.Namespace(no_compile=False, max_autotune=True), f, g)
    assert list(cols) == ["torch.compile", "torch.compile max-autotune", "ours + compile"]
    assert list(timing.compiled(argparse.Namespace(no_compile=False, max_autotune=False), f)) == ["torch.compile"]
    x = torch.ones(3)  # compiled at the first call: both columns compute what they wrap
    assert torch.equal(cols["torch.compile"](x), f(x)) and torch.equal(cols["ours + compile"](x), g(x))


def test_report_settings_let_every_row_compile_and_turn_tf32_off():
    # Dynamo counts compiles per function's code, shared by every torch.compile of it: past 8
    # (the report compiles the model's forward per size, shape, dtype) a compiled column would
    # quietly run eager. Twelve static shapes of one function: 8 compiles, 12 in the report.
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    def outside(x):
        return x * 2

    def inside(x):
        return x * 3

    for fn, settings in ((outside, contextlib.nullcontext()), (inside, timing.report_settings())):
        compiles.clear()
        with settings:
            compiled = torch.compile(fn, backend=counting, dynamic=False)
            for n in range(1, 13):
                assert torch.equal(compiled(torch.ones(n)), fn(torch.ones(n)))
        assert len(compiles) == (8 if fn is outside else 12)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's default, say
        with timing.report_settings():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite times CUDA kernels: the speed report's stage")
def test_pytest_benchmark_suite_runs():
    # `pytest benchmarks/` (the README's), each of ours' cases run once (--benchmark-disable), on
    # this CPU (the C++ twins and eager's ops, not the interpreter); a case's set-up is its
    # column's too (a wrong grad shape once failed all three of a case's columns for a day unseen),
    # and the eager and torch.compile columns (a minute of compiles) are left out for time
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                          "--benchmark-disable", "-k", "not compile and not eager"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    passed = re.search(r"([0-9]+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 19, out.stdout[-3000:]  # ours' cases, the CPU's


def test_host_overhead_tool_runs_the_model_through_tritons_gpu_launch_path():
    # tools/host_overhead.py: the host's share of a forward, measured on a CPU (its own process:
    # it stubs Triton's launches); --gpu-launch: each launch down Triton's own launch path, the
    # kernels compiled for sm_90 (about 15 s here with Triton's cache cold; the --train test
    # below takes the interpreter's stubbed launches)
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "tools/host_overhead.py", "--size", "tiny", "--reps", "2", "--by-op",
                          "--eager", "--gpu-launch"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # MPViT-T's 23 blocks: the qkv GEMM, the attention (one launch on maps this small), then the
    # residual LayerNorm and fc1's GEMM each, or in stages 1 and 2 (8 blocks) the rest of the
    # block in one kernel; 11 patch embeddings; 4 GLI projections and 8 InvRes 1x1s; each through
    # Triton's JITFunction.run to the stand-in driver's launcher
    assert "MPViT-Tiny batch 1 16x16 eval, kernels stubbed (and the GEMMs and convs)" in out.stdout, out.stdout
    assert "107 Triton launches through Triton's GPU launch path" in out.stdout, out.stdout
    assert re.search(r"Triton's launch path \(stand-in sm_90 driver\), in turns with launches returning at once: "
                     r"[0-9.]+ vs [0-9.]+ ms a forward, -?[0-9.]+ ms, -?[0-9.]+ us a launch", out.stdout), out.stdout
    # --eager: the public model timed in turns with ours, its GEMMs and convs stubbed as ours are
    assert re.search(r"public model, eager \(NCHW, its GEMMs and convs stubbed\): [0-9.]+ ms a forward .*; "
                     r"ours/eager [0-9.]+", out.stdout), out.stdout
    # --by-op: the calls a forward of each op the model makes (the CPE's and InvRes' depthwise
    # convs: 23 + 4; each of the 11 encoders asks crpe_packing, which in inference packs nothing),
    # each once, not again inside another
    calls = {line.split(" | ")[0][2:]: int(line.split(" | ")[1]) for line in out.stdout.splitlines()
             if line.startswith("| ") and line.split(" | ")[1].strip().isdigit()}
    assert calls == {"linear": 38, "linear_proj_mlp": 8, "factor_attention": 23, "residual_layernorm": 15, "depthwise": 27,
                     "gli_projection": 12, "dwconv_bn": 11, "crpe_packing": 11}, out.stdout
    assert "| everything else (modules, aten ops between ours) |" in out.stdout, out.stdout


def test_host_overhead_tool_times_a_training_step_of_narrowed_models():
    # --train: forward, loss and backward of both models in turns, every stage --width wide (the
    # GEMMs cannot be stubbed under autograd)
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = [sys.executable, "tools/host_overhead.py", "--size", "tiny", "--reps", "2", "--train"]
    out = subprocess.run(tool + ["--width", "16", "--eager"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = re.search(r"MPViT-Tiny 16 wide batch 2 16x16 train, kernels stubbed, 1 thread\(s\): [0-9.]+ ms a training "
                     r"step .*, ([0-9]+) Triton launches stubbed", out.stdout)
    assert ours and int(ours.group(1)) > 107, out.stdout  # the eval forward's 107, then the backward's
    assert re.search(r"public model, eager \(NCHW\): [0-9.]+ ms a training step .*; ours/eager [0-9.]+", out.stdout), \
        out.stdout


def test_train_step_traffic_tool_counts_a_step_of_both_models():
    # tools/train_step_traffic.py: a training step's launches and bytes on meta tensors, eager vs ours
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_step_traffic.py")
    spec = importlib.util.spec_from_file_location("train_step_traffic", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    eager, ours = (tool.count(impl, "tiny", 2, 64, torch.float32) for impl in ("eager", "ours"))
    assert ours.launches < eager.launches and ours.bytes < eager.bytes
    assert sum(eager.op_launches.values()) == eager.launches and sum(ours.op_bytes.values()) == ours.bytes
    # fc1's GELU grad and bias grad in the GEMM that recomputes the pre-activation and fc2's input
    # grad (+ the partial sums' sum); the MLP's forward three launches (fc1 + GELU, addmm's copy of
    # r and its GEMM)
    assert ours.op_launches["mpvit_kernels.linear_mlp_grad"] == 2 * eager.op_launches["aten.gelu_backward"] > 0
    assert ours.op_launches["mpvit_kernels.linear_mlp"] == 3 * eager.op_launches["aten.gelu_backward"]
    assert not {"aten.gelu_backward", "mpvit_kernels.linear_gelu_grad"} & set(ours.op_launches)
    # with drop path the blocks keep their fused ops (GELU in fc1's GEMM, norm2 with the residual add)
    dropped = tool.count("ours", "tiny", 2, 64, torch.float32, drop_path=0.2)
    assert "aten.gelu" not in dropped.op_launches and "aten.native_layer_norm" in ours.op_launches
    assert dropped.op_launches["aten.native_layer_norm"] == ours.op_launches["aten.native_layer_norm"]
    assert dropped.op_launches["mpvit_kernels.residual_layernorm_fwd"] == 23  # every block of MPViT-T
    # norm1 -> qkv's backward in one GEMM from 8192 rows (+ the partial sums' sum): at batch 12,
    # 224, the 8 blocks of stages 1 and 2; the 15 others recompute the LayerNorm, as eager does
    assert "mpvit_kernels.linear_norm_grad" not in ours.op_launches
    wide = tool.count("ours", "tiny", 12, 224, torch.float32)
    assert wide.op_launches["mpvit_kernels.linear_norm_grad"] == 2 * 8
    assert wide.op_launches["aten.native_layer_norm_backward"] == wide.op_launches["aten.native_layer_norm"] == 15
    # the training BatchNorms' combines take a first level past 256 partial rows: at batch 12 (the
    # stem's first BatchNorm: 1176 programs' statistics), not at batch 2 and 64x64
    assert "batch statistics: combine the programs' (a first level)" in wide.ops
    assert not any(op.endswith("(a first level)") for op in ours.ops)


def test_traffic_model_of_a_batch_norm_combine():
    # two (P, C) arrays of partials into four (C,) results; past 256 rows (COMBINE_CHUNK) first
    # levels, each reading its input and writing two (cdiv(P, 256), C) arrays
    from mpvit_kernels.bench.traffic import _combine

    assert _combine("c", 256, 8, 4) == [("c", 2 * 256 * 8 * 4 + 4 * 8 * 4)]
    assert _combine("c", 600, 8, 4) == [("c (a first level)", 2 * 600 * 8 * 4 + 2 * 3 * 8 * 4),
                                        ("c", 2 * 3 * 8 * 4 + 4 * 8 * 4)]
    assert [name for name, _ in _combine("c", 256 ** 2 + 1, 8, 8)] == ["c (a first level)"] * 2 + ["c"]


def test_linear_section_forces_norm1_backward_either_way():
    # the linear section's extra forward+backward impls of norm1 + qkv, which let a GPU run show
    # from which rows linear_norm_grad pays: the threshold forced inside, restored after
    from mpvit_kernels.bench import linear as section
    from tests.test_linear import linear_op, make_inputs
    from tests.utils import RecordOps

    kept = linear_op.NORM_GRAD_ROWS
    for impl, fused in (("ours, norm1 backward fused", True), ("ours, norm1 backward in ATen ops", False)):
        x, params = make_inputs(10, 8, 24, torch.float32, "tokens", "norm")
        with section.norm_grad_rows(section.NORM_GRAD_IMPLS[impl]), RecordOps() as rec:
            section.ours_norm_qkv(x, *params).sum().backward()
        assert rec.names.count("mpvit_kernels.linear_norm_grad") == fused
        assert linear_op.NORM_GRAD_ROWS == kept
