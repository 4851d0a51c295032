"""The speed report's files: results.json (where it ran, with what, every row), speed_report.md
(the printed report) and speedup.png (bench/plot.py), in one folder per device."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

import torch

import mpvit_kernels
from mpvit_kernels.bench.timing import device_name, device_slug


def default_folder(device: torch.device) -> str:
    return os.path.join("benchmarks", "results", device_slug(device))


def _command_output(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the report ran; None for what this machine does not have."""
    driver = None
    if device.type == "cuda":  # one driver serves every GPU of the machine: the first line will do
        answer = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = answer.splitlines()[0] if answer else None
    # the commit of the checkout this package was imported from (None when it is not one), or
    # GIT_COMMIT's: a device machine gets a copy of the working tree without its .git
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mpvit_kernels.__file__)))
    return {"device": device_name(device), "device_slug": device_slug(device), "driver": driver,
            "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": os.environ.get("GIT_COMMIT") or _command_output(["git", "rev-parse", "HEAD"], cwd=package_root),
            "extension_built": mpvit_kernels.extension_available(), "backend": mpvit_kernels.get_backend()}


def write_report(folder: str, info: dict, rows: list[dict], markdown: str) -> None:
    """results.json and speed_report.md; called after each section, so that a run cut short
    leaves what it measured."""
    os.makedirs(folder, exist_ok=True)
    # each file written aside, then renamed over the last: a time limit's kill mid-write leaves
    # the previous whole file, never half of one
    for name, text in (("results.json", json.dumps({**info, "rows": rows}, indent=1)), ("speed_report.md", markdown)):
        path = os.path.join(folder, name)
        with open(path + ".partial", "w") as f:
            f.write(text)
        os.replace(path + ".partial", path)
