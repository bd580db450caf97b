"""The core stays pure: it imports only jax, numpy, einops, chex and the standard library."""

import ast
import pathlib
import subprocess
import sys

import pytest

CORE = ["schedules", "gaussian", "likelihood", "losses", "continuous", "samplers", "metrics"]
ALLOWED_THIRD_PARTY = {"jax", "jaxlib", "numpy", "scipy", "einops", "chex", "jaxdiff"}
FORBIDDEN = ("flax", "optax", "orbax", "torch", "PIL", "tqdm")
PKG = pathlib.Path(__file__).resolve().parents[2] / "jaxdiff"


def _existing_core():
    return [m for m in CORE if (PKG / f"{m}.py").exists()]


@pytest.mark.parametrize("module", _existing_core())
def test_core_module_imports_only_allowed_packages(module):
    tree = ast.parse((PKG / f"{module}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names)
    bad = {r for r in roots if r not in stdlib and r not in ALLOWED_THIRD_PARTY}
    assert not bad, f"jaxdiff/{module}.py imports {sorted(bad)}"
    inner = {r for r in roots if r == "jaxdiff"}
    if inner:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("jaxdiff")
            ):
                names = [a.name for a in node.names]
                submods = [node.module.split(".")[1]] if "." in node.module else names
                assert all(s in CORE for s in submods), (module, submods)


def test_importing_the_core_loads_no_shell_package():
    mods = ", ".join(f"jaxdiff.{m}" for m in _existing_core())
    code = (
        f"import sys, {mods}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core import pulled in: {out.stdout.strip()}"
