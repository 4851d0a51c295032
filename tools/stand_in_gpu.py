"""Triton's GPU launch path in a process without a GPU, for tools/host_overhead.py --gpu-launch
(what a launch costs the host) and tools/launch_check.py (every Triton launch of the models
compiles for the GPU and binds its arguments as launched), which the interpreter checks neither
of: it runs the Python of each kernel, with no compile, no type of the arguments and no
specialisation.

A stand-in driver (device 0, stream 0, the target of ``arch``) answers what a launch asks of the
GPU. Each kernel compiles for that target at its first launch as on a GPU (ptxas runs here) and
goes through ``JITFunction.run`` (binding and specialisation, the compiled-kernel lookup, the
grid, launch metadata and hooks) and through the checks a GPU's module load and launch make
(shared memory and threads per block, the grid's limits); the launch itself calls ``on_launch``
instead of the driver. An autotuned kernel times only its first config that fits, unless told
to time every one (the stand-in's timer launches the config once and answers 1 ms). The ops
take their Triton path on CPU tensors, as under the interpreter; their outputs are left
unwritten. For a process that does nothing else: Triton's active driver is replaced, and the
kernels must be JIT functions (imported without TRITON_INTERPRET=1).
"""
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import autotuner, driver
from triton.runtime.errors import OutOfResources

from mpvit_kernels.triton import static_compile

# Shared memory a block may opt in to, by compute capability (the CUDA C++ Programming Guide's
# table of technical specifications): the static report's A100 and H100, a B200, and the
# workstation and consumer GPUs (A10/RTX 30xx, L4/L40/RTX 40xx, RTX 50xx), whose 99 KB a tile
# picked for the first two could overflow. Blocks are 1024 threads at most on all.
SHARED_LIMIT = {**static_compile.SHARED_LIMIT, 86: 99 * 1024, 89: 99 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def stand_in_gpu(on_launch, arch: int = 90, every_config: bool = False, verify: bool = True) -> None:
    """Put the stand-in in place (see above): launches call ``on_launch(*launcher_args)``;
    ``every_config``: an autotuned kernel times (so compiles and launches) every config that
    fits, as on a GPU, not the first alone; ``verify``: every launch of ours that skips Triton's
    argument binding (triton.launch.DirectLaunch) is checked against that binding (off
    where host time is measured)."""
    from mpvit_kernels import backend
    from mpvit_kernels.triton.launch import DirectLaunch

    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch must be a compute capability of {sorted(SHARED_LIMIT)}, got {arch}")

    class StandIn:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_benchmarker(self):  # an autotuner's timer: one launch of the config, then "1 ms"
            def bench(fn, quantiles=None, **kwargs):
                fn()
                return [1.0] * len(quantiles) if quantiles else 1.0
            return bench

    def launch(grid_x, grid_y, grid_z, *rest):
        # the driver's limits (an empty grid launches nothing, as Triton's launcher skips it)
        if grid_x > 2**31 - 1 or grid_y > 65535 or grid_z > 65535:
            raise RuntimeError(f"a grid of ({grid_x}, {grid_y}, {grid_z}) programs: CUDA allows 2^31 - 1 in x, "
                               "65535 in y and z")
        on_launch(grid_x, grid_y, grid_z, *rest)

    def handles(self):
        """The module "loaded", after the checks a GPU's load makes (a tuner skips a config that
        fails them, as on a GPU); its launcher ``launch``."""
        if self.module is None:
            if self.metadata.shared > SHARED_LIMIT[arch]:
                raise OutOfResources(self.metadata.shared, SHARED_LIMIT[arch], "shared memory")
            if self.metadata.num_warps * 32 > 1024:
                raise OutOfResources(self.metadata.num_warps * 32, 1024, "threads")
            self.module, self.function, self._run = object(), 0, launch

    driver.set_active(StandIn())
    DirectLaunch.VERIFY = verify
    CompiledKernel._init_handles = handles
    if not every_config:
        prune = autotuner.Autotuner.prune_configs
        autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
    env_flag = backend._env_flag
    backend._env_flag = lambda name: name == "TRITON_INTERPRET" or env_flag(name)
