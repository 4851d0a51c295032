"""Ahead-of-time GPU compile of every Triton kernel of the package, on a machine with no GPU.

Each kernel module gives ``compile_specs()``: (kernel, tag, argument types, constexprs). Every
spec is compiled with ``triton.compile`` for each target arch and each autotune config that
survives the kernel's own pruning, and the cubin's registers and spills are read with the
cuobjdump that ships inside Triton's NVIDIA backend; dynamic shared memory comes from the
compiled kernel's metadata (cuobjdump's SHARED is the static part only).

    python -m mpvit_kernels.triton.static_compile [--out benchmarks/results/static/resource_usage.md]
    python -m mpvit_kernels.triton.static_compile --check benchmarks/results/static/resource_usage.json

``--out`` also writes the rows as JSON beside the table, with a fingerprint of the package's
Triton sources. ``--check`` is what CI runs (a cold compile of everything takes about 10 CPU
minutes): the committed rows must come from these sources and this Triton, list exactly the
compiles the specs ask for and pass every check, and a sample of them (each kernel's heaviest
row per arch) must compile again to the same registers, shared memory, spills and loads. With
another Triton than the committed rows', it compiles everything instead.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = {80: "sm_80 (A100)", 90: "sm_90a (H100)"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in maximum
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


@dataclasses.dataclass
class Usage:
    kernel: str
    tag: str
    config: str
    arch: int
    registers: int = 0
    shared: int = 0
    spill_bytes: int = 0
    warps_per_sm: int = 0
    error: str = ""
    scratch: int = 0  # global scratch bytes (device-side tensor descriptors): the launch needs triton.set_allocator
    widest_load: int = 0  # bytes of the kernel's widest load from global memory (ld.global or cp.async), 0 unread
    two_byte_loads: int = 0  # global loads of one 16-bit element each: a 16-bit row read element by element
    mma: str = ""  # the dots' instructions: "wgmma" (Hopper's), "mma.sync" (Ampere's tensor cores), "-" none


def kernel_modules():
    import mpvit_kernels.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "static_compile":
            yield importlib.import_module(f"{pkg.__name__}.{info.name}")


def jit_function(kernel):
    """The JITFunction behind a kernel (the interpreter's stand-in under TRITON_INTERPRET=1),
    under any autotune / heuristics wrappers."""
    while isinstance(kernel, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
        kernel = kernel.fn
    return kernel


FLOAT_TYPES = ("fp16", "bf16", "fp32", "fp64")


def float_launch_type(fn, name: str) -> str:
    """The type Triton's launcher gives a Python float passed to parameter ``name`` of the
    kernel ``fn`` (a JITFunction): the parameter's annotation if it has one, else what Triton
    makes of any float (fp32)."""
    param = inspect.signature(fn.fn).parameters[name]
    return triton.runtime.jit.KernelParam(0, param, False, False).annotation_type or triton.runtime.jit.mangle_type(0.1)


def launched_kernels(module) -> dict[str, object]:
    """The module's launchable kernels: @triton.jit functions (bare, autotuned or with heuristics) whose names do
    not start with '_' (those are device helpers inlined into the kernels)."""
    found = {}
    for name, obj in vars(module).items():
        if not isinstance(obj, triton.runtime.KernelInterface) or name.startswith("_"):
            continue
        if jit_function(obj).fn.__module__ == module.__name__:
            found[name] = obj
    return found


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def configs_of(kernel, constexprs):
    """(meta-parameters, num_warps, num_stages, maxnreg) of each config the kernel can launch
    with at these constexprs: its autotune list as its own prune leaves it, or what its
    heuristics compute."""
    if isinstance(kernel, triton.runtime.Autotuner):
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, {}, **constexprs)
        return [(dict(c.kwargs), c.num_warps, c.num_stages, c.maxnreg) for c in configs]
    if isinstance(kernel, triton.runtime.Heuristics):
        meta = {name: value(dict(constexprs)) for name, value in kernel.values.items()}
        return [(meta, meta.pop("num_warps", 4), meta.pop("num_stages", 3), meta.pop("maxnreg", None))]
    return [({}, 4, 3, None)]


_LOAD = re.compile(r"\bld\.global[\w:.]*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global[\w:.]*\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def load_widths(ptx: str) -> list[int]:
    """Bytes of each global-memory load in ``ptx`` (an ld.global, vector or not, or a cp.async
    into shared memory): 16 where Triton could prove 16-byte alignment, 2 for a 16-bit dtype
    read one element at a time."""
    return [int(v or 1) * int(bits) // 8 for v, bits in _LOAD.findall(ptx)] + \
        [int(n, 0) for n in _CP_ASYNC.findall(ptx)]


def tensor_core_instructions(ptx: str) -> str:
    """What the kernel's dots run as: "wgmma" (sm_90a's asynchronous warpgroup MMA, which needs
    64 rows a warpgroup), "mma.sync" (the warp-level MMA, Ampere's and the fallback on sm_90a) or
    "-" (no tensor-core instruction: FMA dots, fp32/fp64, or no dot)."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "-"


def widest_load(ptx: str) -> int:
    return max(load_widths(ptx) + [0])


def as_launched(spec, kernel=None, suffix: str = ""):
    """``spec`` (kernel, tag, types, constexprs) as MPViT launches the kernel: every pointer
    marked as a launch on 16-byte-aligned tensors specialises it (fresh allocations are), and
    VEC=8 (widths and row strides multiples of 8, launch.vector_width); tagged "VEC=8
    aligned", plus ``suffix``, through ``kernel`` if given (another launcher of the same code)."""
    spec_kernel, tag, types, constexprs = spec
    return (kernel or spec_kernel, tag + " VEC=8 aligned" + suffix,
            {name: ty + ":16" if ty.startswith("*") else ty for name, ty in types.items()}, {**constexprs, "VEC": 8})


def config_label(kwargs: dict, warps: int) -> str:
    return ", ".join([f"{k}={v}" for k, v in kwargs.items()] + [f"warps={warps}"])


def compile_one(kernel, tag, types, constexprs, config, arch) -> Usage:
    """One compile. A type ending in ":16" is an argument the launch specialises as a multiple
    of 16 (Triton does so for a pointer 16-byte aligned and an integer divisible by 16); the
    others get no alignment hint, the worst case a launch can specialise to."""
    fn = jit_function(kernel)
    kwargs, warps, stages, maxnreg = config
    # a constexpr parameter the spec leaves out takes its default, as at a launch that omits it
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    cx = {**defaults, **constexprs, **kwargs}
    usage = Usage(fn.__name__, tag, config_label(kwargs, warps), arch)
    signature = {name: types.get(name, "i32").removesuffix(":16") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in cx})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in types.items() if ty.endswith(":16")}
    narrowed = [f"{name}: spec {ty}, launched as {float_launch_type(fn, name)}" for name, ty in types.items()
                if ty in FLOAT_TYPES and float_launch_type(fn, name) != ty]
    if narrowed:  # the compile would not be what a launch with a Python float runs
        usage.error = "float argument typed unlike its launch: " + "; ".join(narrowed)
        return usage
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=cx, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages,
                                           **({"maxnreg": maxnreg} if maxnreg else {})})
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        usage.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = {}
    for line in dump.splitlines():
        if "REG:" in line:
            fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
    usage.registers = int(fields.get("REG", 0))
    usage.spill_bytes = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    usage.shared = int(compiled.metadata.shared) + int(fields.get("SHARED", 0))
    usage.scratch = int(getattr(compiled.metadata, "global_scratch_size", 0) or 0)
    widths = load_widths(compiled.asm["ptx"])
    usage.widest_load, usage.two_byte_loads = max(widths + [0]), widths.count(2)
    usage.mma = tensor_core_instructions(compiled.asm["ptx"])
    regs_per_warp = max(usage.registers, 1) * 32
    usage.warps_per_sm = min(MAX_WARPS_PER_SM, (REGS_PER_SM // (regs_per_warp * warps)) * warps)
    if usage.shared:
        usage.warps_per_sm = min(usage.warps_per_sm, (SHARED_LIMIT[arch] // usage.shared) * warps)
    return usage


def _compile_job(job) -> Usage:
    """One compile, named by (module, spec index, config index, arch) so a worker process can
    run it: kernels do not pickle."""
    module_name, spec, config, arch = job
    kernel, tag, types, constexprs = importlib.import_module(module_name).compile_specs()[spec]
    return compile_one(kernel, tag, types, constexprs, configs_of(kernel, constexprs)[config], arch)


def plan(archs=tuple(ARCHS)) -> tuple[dict[tuple, tuple], list[str]]:
    """Every compile job, (module, spec index, config index, arch), by the key of the row it
    reports (:func:`row_key`), in spec order; and the launchable kernels that have no spec.
    Outside the interpreter only: it narrows the autotune lists to one config."""
    jobs, missing = {}, []
    for module in kernel_modules():
        kernels = launched_kernels(module)
        specs = module.compile_specs() if hasattr(module, "compile_specs") else []
        covered = {jit_function(k).__name__ for k, *_ in specs}
        missing += [f"{module.__name__}.{name}" for name, k in kernels.items() if jit_function(k).__name__ not in covered]
        for i, (kernel, tag, types, constexprs) in enumerate(specs):
            for j, (kwargs, warps, *_) in enumerate(configs_of(kernel, constexprs)):
                for arch in archs:
                    jobs[(jit_function(kernel).__name__, tag, config_label(kwargs, warps), arch)] = (
                        module.__name__, i, j, arch)
    return jobs, missing


def row_key(u: Usage) -> tuple:
    return (u.kernel, u.tag, u.config, u.arch)


def compile_jobs(jobs: list) -> list[Usage]:
    """Compile ``jobs``, one worker process per core, results in the jobs' order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # the kernels are interpreted functions then
        raise RuntimeError("static_compile compiles for GPU targets: run it in a process without TRITON_INTERPRET=1")
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_job(job) for job in jobs]
    # fork: the workers inherit the imported kernels (and this process never touches a GPU)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=4))


def run_all(archs=tuple(ARCHS)) -> tuple[list[Usage], list[str]]:
    """Compile every spec (in spec order); also return the launchable kernels that have no spec."""
    jobs, missing = plan(archs)
    return compile_jobs(list(jobs.values())), missing


def problems(results: list[Usage], missing: list[str]) -> list[str]:
    """What keeps the Triton kernels' rows from passing: a kernel without a spec, a compile
    error, a spill, shared memory over the limit, no block fitting an SM, global scratch
    anywhere but the TMA GEMM (a launch fails without triton.set_allocator, which only
    ops.gli_projection sets), or a row read narrower than 16 bytes at a time where MPViT's
    widths and aligned tensors allow it (VEC=8; a few 2-byte loads are a narrow tile's
    per-channel parameters, one element per thread, where a row read element by element makes
    dozens)."""
    found = [f"kernels without a compile spec: {missing}"] if missing else []
    for u in results:
        what = (f"compile error {u.error}" if u.error else f"{u.spill_bytes} B of spills" if u.spill_bytes else
                f"{u.shared} B of shared memory" if u.shared > SHARED_LIMIT[u.arch] else
                "no block fits an SM" if not u.warps_per_sm else "")
        if what:
            found.append(f"{u.kernel} [{u.tag}] {u.config} sm_{u.arch}: {what}")
    if {u.arch for u in results} != set(ARCHS) or len(results) <= 100:
        found.append(f"{len(results)} compiles for archs {sorted({u.arch for u in results})}")
    scratch = {(u.kernel, u.arch, u.tag.endswith(" TMA")) for u in results if u.scratch}
    if scratch != {("gli_gemm_kernel", 90, True)}:
        found.append(f"global scratch in {sorted(scratch)}, not only gli_gemm_kernel's TMA path on sm_90")
    vec8 = [u for u in results if "VEC=8 aligned" in u.tag]
    found += [f"{u.kernel} [{u.tag}] sm_{u.arch}: widest load {u.widest_load} B, {u.two_byte_loads} 2-byte loads"
              for u in vec8 if u.widest_load != 16 or u.two_byte_loads > 4]
    if not vec8:
        found.append("no VEC=8 aligned compile")
    return found


def source_fingerprint() -> str:
    """sha256 of the package's Triton sources (every module beside this one, and this one):
    what a report's rows were compiled from."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def report_json(results: list[Usage]) -> str:
    head = json.dumps({"triton": triton.__version__, "sources": source_fingerprint()})[:-1]
    rows = ",\n".join(json.dumps(dataclasses.asdict(u)) for u in results)  # a row a line: diffs stay readable
    return f'{head}, "kernels": [\n{rows}\n]}}\n'


SAMPLE_FIELDS = ("registers", "shared", "spill_bytes", "scratch", "widest_load", "two_byte_loads", "mma", "error")


def check_committed(path: str) -> list[str]:
    """What is wrong with the committed rows at ``path`` (JSON from ``--out``), or []: see the
    module docstring. With another Triton than the rows', the problems of a full compile."""
    with open(path) as f:
        committed = json.load(f)
    if committed["sources"] != source_fingerprint():  # stale whatever the Triton
        return [f"{path} was compiled from other Triton sources than mpvit_kernels/triton/ holds now: run "
                "`make static-report` and commit what it writes"]
    if committed["triton"] != triton.__version__:
        print(f"{path} is for triton {committed['triton']}, this is {triton.__version__}: compiling everything",
              file=sys.stderr)
        return problems(*run_all())
    rows = [Usage(**row) for row in committed["kernels"]]
    jobs, missing = plan()
    keys = [row_key(u) for u in rows]
    if sorted(keys) != sorted(jobs):
        return [f"{path} lists other compiles than the specs ask for (run `make static-report`): missing "
                f"{sorted(set(jobs) - set(keys))[:5]}, extra {sorted(set(keys) - set(jobs))[:5]}"]
    found = problems(rows, missing)
    heaviest = {}
    for u in rows:
        best = heaviest.get((u.kernel, u.arch))
        if best is None or (u.registers, u.shared) > (best.registers, best.shared):
            heaviest[(u.kernel, u.arch)] = u
    sample = list(heaviest.values())
    for want, got in zip(sample, compile_jobs([jobs[row_key(u)] for u in sample])):
        differ = [f"{name} {getattr(want, name)!r} -> {getattr(got, name)!r}" for name in SAMPLE_FIELDS
                  if getattr(want, name) != getattr(got, name)]
        if differ:
            found.append(f"{want.kernel} [{want.tag}] {want.config} sm_{want.arch} compiles unlike {path}: "
                         + ", ".join(differ))
    print(f"{len(rows)} committed compiles checked, {len(sample)} compiled again", file=sys.stderr)
    return found


def extension_library() -> str | None:
    """Path of the built mpvit_kernels._C, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("mpvit_kernels._C")
    return spec.origin if spec and spec.origin and os.path.exists(spec.origin) else None


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    # "void ns::(anonymous namespace)::kernel<args>(params)" -> "kernel<args>"
    m = re.search(r"(\w+(?:<[^()]*>)?)\(", out)
    return (m.group(1) if m else out).replace("c10::", "")


def cuda_extension_usage(library: str) -> list[Usage]:
    """The CUDA kernels of the extension, per arch, as cuobjdump reads them off the library."""
    dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True).stdout
    results, arch, name = [], None, None
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(re.sub(r"\D", "", line.split("sm_")[1]))
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and name and arch in ARCHS:
            fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
            u = Usage(_demangle(name), "CUDA (_C)", "256 threads", arch, int(fields["REG"]), int(fields["SHARED"]),
                      int(fields["STACK"]) + int(fields["LOCAL"]))
            u.warps_per_sm = min(MAX_WARPS_PER_SM, (REGS_PER_SM // (max(u.registers, 1) * 32 * 8)) * 8)
            results.append(u)
    return sorted(results, key=lambda u: (u.arch, u.kernel))  # the library's order varies between builds


def mma_summary(results: list[Usage]) -> str:
    """Which kernels' 16-bit sm_90a compiles run their dots as mma.sync rather than wgmma (a tile
    under 64 rows a warpgroup), with the tags: where Hopper's tensor cores run at Ampere's rate.
    (fp64 dots are mma.sync on sm_90a whatever the tile; fp32 ones FMA.)"""
    sync = {}
    sixteen = [u for u in results if u.arch == 90 and u.tag.split()[0] in ("fp16", "bf16")]
    for u in sixteen:
        if u.mma == "mma.sync":
            sync.setdefault(u.kernel, []).append(u.tag)
    wgmma = sum(u.mma == "wgmma" for u in sixteen)
    lines = [f"sm_90a, 16-bit: {wgmma} compiles run their dots as wgmma, {sum(map(len, sync.values()))} as mma.sync"
             + (":" if sync else ".")]
    lines += [f"- {kernel}: {len(tags)} ({'; '.join(sorted(set(tags))[:4])}{'; ...' if len(set(tags)) > 4 else ''})"
              for kernel, tags in sorted(sync.items())]
    return "\n".join(lines)


def table(results: list[Usage]) -> str:
    lines = ["| kernel | inputs | config | arch | registers | shared memory (B) | spills (B) | warps/SM | widest load (B) "
             "| 2-byte loads | tensor cores | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in results:
        status = "COMPILE ERROR: " + u.error if u.error else (
            "SPILLS" if u.spill_bytes else ("SHARED OVER LIMIT" if u.shared > SHARED_LIMIT[u.arch] else
                                            "NO BLOCK FITS AN SM" if not u.warps_per_sm else
                                            f"ok ({u.scratch} B global scratch per program: "
                                            "triton.set_allocator)" if u.scratch
                                            else "ok"))
        lines.append(f"| {u.kernel} | {u.tag} | {u.config} | {ARCHS[u.arch]} | {u.registers} | {u.shared} | "
                     f"{u.spill_bytes} | {u.warps_per_sm} | {u.widest_load or '-'} | {u.two_byte_loads if u.widest_load else '-'} "
                     f"| {u.mma or '-'} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown table here, and the rows as JSON beside it (.json)")
    p.add_argument("--check", metavar="JSON", help="check committed rows instead of writing a report (exit 1 on a "
                   "problem)")
    args = p.parse_args(argv)
    if args.check:
        found = check_committed(args.check)
        print("\n".join(found) if found else f"{args.check}: ok")
        return 1 if found else 0
    results, missing = run_all()
    triton_rows = list(results)
    library = extension_library()
    cuda = cuda_extension_usage(library) if library else []
    text = ("# GPU kernels compiled ahead of time (no GPU)\n\n"
            f"triton {triton.__version__}; registers and spills from cuobjdump --dump-resource-usage, shared memory "
            "from the compiled kernel's metadata (Triton) or cuobjdump (CUDA); warps/SM is the occupancy those "
            "allow; widest load is the widest ld.global or cp.async in the PTX (16 B: vectorised), 2-byte loads "
            "how many read one 16-bit element each (a row read element by element); tensor cores what the "
            "dots compile to (wgmma: sm_90a's warpgroup MMA, which takes 64 rows a warpgroup; mma.sync: the "
            "warp-level MMA, Ampere's, and sm_90a's below that; -: FMA dots or none). Inputs "
            "marked 'aligned' compile with the alignment a launch on 16-byte-aligned tensors gets, the "
            "others with none (the worst case).\n\n" + mma_summary(results) + "\n\n## Triton kernels\n\n"
            + table(results) + "\n")
    text += ("\n## CUDA kernels of mpvit_kernels._C\n\n" + table(cuda) + "\n") if cuda else \
        "\n(mpvit_kernels._C is not built: no CUDA kernels read)\n"
    results += cuda
    if missing:
        text += "\nKernels without a compile spec: " + ", ".join(missing) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            f.write(report_json(triton_rows))
    print(text)
    bad = [u for u in results if u.error or u.shared > SHARED_LIMIT[u.arch] or not u.warps_per_sm]
    spills = [u for u in results if u.spill_bytes]
    print(f"{len(results)} compiles, {len(bad)} errors, over the shared-memory limit or with no block fitting an SM "
          f"(registers x threads), {len(spills)} with spills", file=sys.stderr)
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
