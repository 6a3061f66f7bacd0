#!/usr/bin/env python3
"""Regenerate the complete-platform JSON files in this folder.

Maintainer tool: the JSON files it writes are committed and build_pex.sh reads
them; nothing runs this at build time.  It needs the `packaging` library
(`python3 -m pip install packaging`), and writes the same bytes every time.

A complete platform is what `pex3 interpreter inspect --markers --tags` prints
for a real interpreter, trimmed: the PEP 508 marker environment plus the
ordered list of wheel tags the interpreter accepts.  Writing them here lets
this Linux machine resolve wheels for machines it is not (macOS, aarch64), and
lets the universal pex accept *only* pure-Python wheels.

    python3 pex/gen_complete_platforms.py        # rewrite pex/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from packaging import tags

HERE = Path(__file__).resolve().parent

# Universal pex: every CPython from 3.10 on, pure wheels only.
UNIVERSAL_MINORS = (10, 11, 12, 13, 14)

# Native pexes: one CPython version, with compiled speedups.
NATIVE_MINOR = 12
# Oldest glibc the manylinux natives accept (CentOS 7 / RHEL 7 era and newer).
MANYLINUX_GLIBC = (2, 17)
# Oldest macOS the mac natives accept (Big Sur; httptools ships macosx_11_0
# wheels only, the rest accept 10.13+ or universal2).
MACOS_VERSION = (11, 0)


def manylinux_platforms(arch: str, glibc: tuple[int, int]) -> list[str]:
    """manylinux_2_N_<arch> from glibc down to 2.5, with the legacy aliases,
    newest first (the order packaging.tags uses on a real Linux box).  No bare
    linux_<arch>: that tag only names wheels built on the machine itself."""
    legacy = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
    # manylinux2010/manylinux1 only ever existed for x86_64 and i686;
    # aarch64 wheels start at glibc 2.17.
    lowest = 5 if arch in ("x86_64", "i686") else 17
    out = []
    for minor in range(glibc[1], lowest - 1, -1):
        out.append(f"manylinux_2_{minor}_{arch}")
        alias = legacy.get((2, minor))
        if alias and (alias == "manylinux2014" or arch in ("x86_64", "i686")):
            out.append(f"{alias}_{arch}")
    return out


def mac_platforms(arch: str, version: tuple[int, int]) -> list[str]:
    return list(tags.mac_platforms(version, arch))


def native_tags(minor: int, platforms: list[str]) -> list[str]:
    pyver = (3, minor)
    out = [str(t) for t in tags.cpython_tags(pyver, [f"cp3{minor}"], platforms)]
    out += [str(t) for t in tags.compatible_tags(pyver, f"cp3{minor}", platforms)]
    return out


def pure_tags(minor: int) -> list[str]:
    # platforms=[] leaves only the "*-none-any" tags: pure Python wheels.
    return [str(t) for t in tags.compatible_tags((3, minor), f"cp3{minor}", [])]


def markers(minor: int, system: str, machine: str) -> dict[str, str]:
    sys_platform = {"Linux": "linux", "Darwin": "darwin"}[system]
    release = {"Linux": "", "Darwin": "20.0.0"}[system]  # Darwin 20 = macOS 11
    return {
        "implementation_name": "cpython",
        "implementation_version": f"3.{minor}.0",
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": release,
        "platform_system": system,
        "platform_version": "",
        "python_full_version": f"3.{minor}.0",
        "python_version": f"3.{minor}",
        "sys_platform": sys_platform,
    }


def write(name: str, marker_env: dict[str, str], compatible_tags: list[str], note: str) -> None:
    doc = {
        "comment": note,
        "marker_environment": marker_env,
        "compatible_tags": compatible_tags,
    }
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)} ({len(compatible_tags)} tags)", file=sys.stderr)


def main() -> int:
    for minor in UNIVERSAL_MINORS:
        write(
            f"universal-cp3{minor}",
            # Only python_version-style markers matter for uni-api's deps; the
            # OS markers say Linux, which also holds for macOS and FreeBSD here.
            markers(minor, "Linux", "x86_64"),
            pure_tags(minor),
            f"CPython 3.{minor}, any OS: accepts only pure-Python (*-none-any) wheels.",
        )
    m = NATIVE_MINOR
    for arch in ("x86_64", "aarch64"):
        write(
            f"linux-{arch}-cp3{m}",
            markers(m, "Linux", arch),
            native_tags(m, manylinux_platforms(arch, MANYLINUX_GLIBC)),
            f"CPython 3.{m}, Linux {arch}, glibc >= {MANYLINUX_GLIBC[0]}.{MANYLINUX_GLIBC[1]} (manylinux).",
        )
    for arch, name in (("arm64", "arm64"), ("x86_64", "x86_64")):
        write(
            f"macos-{name}-cp3{m}",
            markers(m, "Darwin", arch),
            native_tags(m, mac_platforms(arch, MACOS_VERSION)),
            f"CPython 3.{m}, macOS >= {MACOS_VERSION[0]}.{MACOS_VERSION[1]} {arch}.",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
