"""The core stays pure: it imports only jax, numpy, einops, chex and the standard library."""

import ast
import pathlib
import subprocess
import sys

import pytest

CORE = [
    "schedules",
    "gaussian",
    "likelihood",
    "losses",
    "continuous",
    "samplers",
    "guidance",
    "metrics",
]
ALLOWED_THIRD_PARTY = {"jax", "jaxlib", "numpy", "scipy", "einops", "chex", "jaxdiff"}
FORBIDDEN = ("flax", "optax", "orbax", "torch", "PIL", "tqdm")
PKG = pathlib.Path(__file__).resolve().parents[2] / "jaxdiff"


def _existing_core():
    return [m for m in CORE if (PKG / f"{m}.py").exists() or (PKG / m).is_dir()]


def _core_files():
    """(name, path) of every core source file; a core package contributes each of its modules."""
    files = []
    for m in _existing_core():
        if (PKG / m).is_dir():
            files += [(f"{m}/{p.name}", p) for p in sorted((PKG / m).glob("*.py"))]
        else:
            files.append((f"{m}.py", PKG / f"{m}.py"))
    return files


@pytest.mark.parametrize(("module", "path"), _core_files(), ids=[n for n, _ in _core_files()])
def test_core_module_imports_only_allowed_packages(module, path):
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names)
    bad = {r for r in roots if r not in stdlib and r not in ALLOWED_THIRD_PARTY}
    assert not bad, f"jaxdiff/{module} imports {sorted(bad)}"
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


def test_importing_jaxdiff_starts_no_jax_backend():
    """``jax.distributed.initialize`` must run before any backend starts, so importing any
    jaxdiff module may not touch a device (a module-level ``jnp`` constant once did)."""
    mods = sorted({_module_name(p) for p in PKG.rglob("*.py")})
    code = (
        "import importlib, sys\n"
        "from jax._src import xla_bridge\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "    if xla_bridge.backends_are_initialized():\n"
        "        sys.exit(f'importing {m} started a JAX backend')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """The jaxdiff modules a module imports when it is imported (not inside functions), with
    the packages whose ``__init__`` each import runs."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in found if n.startswith("jaxdiff")}


def test_no_module_imports_itself_through_a_cycle():
    """A cycle of module-level imports breaks ``import jaxdiff.X`` when X is imported first
    (``import jaxdiff.convert`` once failed: convert -> models -> inception -> convert)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    # a module's own packages are initialised before it, so importing them closes no cycle
    graph = {
        m: {n for n in _top_level_imports(p) if n in modules and not f"{m}.".startswith(f"{n}.")}
        for m, p in modules.items()
    }

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
