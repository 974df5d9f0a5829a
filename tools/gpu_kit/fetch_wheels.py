"""Download the wheels a GPU machine without a package registry lacks, and check them.

    python tools/gpu_kit/fetch_wheels.py                 # -> .whl/ (git-ignored), checked
    python tools/gpu_kit/fetch_wheels.py --check-only    # check what .whl/ holds now

Run it on a machine that reaches PyPI (any OS and Python: pip is told the target). It fetches
tools/gpu_kit/wheels.txt as cp312 manylinux x86_64 binary wheels without their dependencies,
then checks that
- every wheel's Requires-Dist (extras aside) is another wheel here or a package the GPU
  machine has (tools/gpu_kit/target_has.txt),
- no project is there twice (two versions stop `pip install --no-index` as a whole),
- the wheels total at most --max-mib (default 64 MiB, what travels with the checkout).
Wheels you add by hand (a flash-attn built for the machine's torch, say) are checked the same
way. Exit status: 0 ready, 1 a check failed, 2 pip could not download.
"""
from __future__ import annotations

import argparse
import email.parser
import glob
import os
import re
import subprocess
import sys
import zipfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# pip matches manylinux tags exactly: name every glibc level the target's wheels may carry.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: str) -> list[str]:
    """Names from a requirements-style list (comments, blank lines and pins ignored)."""
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(normalize(re.split(r"[<>=!~; \[]", line, maxsplit=1)[0]))
    return names


# The GPU machine, for evaluating requirement markers (sys_platform, python_version, ...).
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
          "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}


def wheel_metadata(path: str) -> tuple[str, str, list[str]]:
    """(project, version, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist()
                         if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode("utf-8"))
    return normalize(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or []


def needed_on_target(requirement: str, python: str) -> Optional[str]:
    """The project a Requires-Dist line needs on the GPU machine (None: an extra, or a marker
    that does not hold there)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    env = dict(TARGET, python_version=python, python_full_version=f"{python}.0")
    if req.marker is not None and not req.marker.evaluate(env):
        return None
    return normalize(req.name)


def check_wheels(dest: str, have: list[str], max_mib: float, python: str = "3.12") -> list[str]:
    """Problems with the wheels in `dest` (empty: ready to carry)."""
    wheels = sorted(glob.glob(os.path.join(dest, "*.whl")))
    if not wheels:
        return [f"{dest}: no wheels"]
    metadata = {path: wheel_metadata(path) for path in wheels}
    present = {name for name, _, _ in metadata.values()} | set(have)
    problems, versions = [], {}
    for path, (name, version, requires) in metadata.items():
        versions.setdefault(name, []).append(f"{version} ({os.path.basename(path)})")
        for requirement in requires:
            needed = needed_on_target(requirement, python)
            if needed is not None and needed not in present:
                problems.append(f"{os.path.basename(path)} requires {requirement!r}: neither a "
                                f"wheel in {dest} nor in tools/gpu_kit/target_has.txt; add it "
                                "to tools/gpu_kit/wheels.txt")
    for name, found in versions.items():
        if len(found) > 1:
            problems.append(f"{name} is there {len(found)} times ({', '.join(found)}): "
                            "delete all but one")
    total = sum(os.path.getsize(w) for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {dest}:")
    for path in wheels:
        print(f"  {os.path.getsize(path) / 2**20:7.1f} MiB  {os.path.basename(path)}")
    if total > max_mib:
        problems.append(f"the wheels total {total:.1f} MiB, over the {max_mib:g} MiB that "
                        "travel with the checkout")
    return problems


def download(dest: str, python: str) -> int:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--dest", dest,
           "-r", os.path.join(HERE, "wheels.txt")]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=os.path.join(REPO, ".whl"))
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--max-mib", type=float, default=64.0)
    p.add_argument("--check-only", action="store_true", help="check, download nothing")
    ns = p.parse_args(argv)
    os.makedirs(ns.dest, exist_ok=True)
    if not ns.check_only and download(ns.dest, ns.python) != 0:
        print("error: pip could not download the wheels (is PyPI reachable?)", file=sys.stderr)
        return 2
    problems = check_wheels(ns.dest, read_names(os.path.join(HERE, "target_has.txt")),
                            ns.max_mib, ns.python)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"ready: carry {os.path.relpath(ns.dest, REPO)}/ to the GPU machine and run "
              "`bash tools/gpu_kit/run.sh OUT_DIR` there (docs/performance.md)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
