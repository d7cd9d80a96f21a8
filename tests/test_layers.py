"""The layers point one way (docs/ARCHITECTURE.md), and the runtime runs without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from runtime import Session

ROOT = Path(__file__).resolve().parent.parent

# Which project packages each package may import (itself included). bundle/ is the contract and
# stands on nothing; quant/ and runtime/ stand on it alone; converter/ runs the whole pipeline.
ALLOWED = {
    "bundle": {"bundle"},
    "quant": {"bundle", "quant"},
    "runtime": {"bundle", "runtime"},
    "android_harness": {"bundle", "android_harness"},
    "converter": {"bundle", "quant", "runtime", "converter"},
}
PROJECT = set(ALLOWED) | {"tests", "bench"}


def imported_packages(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in `path` that names a project package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]  # relative: inside its own package
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in PROJECT]
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"{package}/ has no Python files"
        for path in files:
            for line, target in imported_packages(path, package):
                if target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == [], "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_rule_catches_a_wrong_import(tmp_path):
    """The checker itself: an upward import and a relative one are both seen."""
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom converter.pipeline import convert\nfrom . import engine\nimport quant.recipes as r\n")
    assert imported_packages(module, "runtime") == [(2, "converter"), (3, "runtime"), (4, "quant")]


# Any import of these raises ImportError in the child: the phone-side runner must not need them.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "transformers", "litert_torch", "ai_edge_quantizer", "timm", "converter", "quant"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_without_torch(tiny_bundle):
    prompt = [2, 10, 20, 30, 40]
    script = BLOCKER + f"""
import json, runtime, runtime.cli, runtime.engine, runtime.media
from runtime import Session
tokens = Session({str(tiny_bundle)!r}).generate({prompt!r}, max_new_tokens=5).token_ids
print(json.dumps({{"tokens": tokens, "torch": "torch" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["tokens"] == Session(tiny_bundle).generate(prompt, max_new_tokens=5).token_ids


def test_blocker_blocks():
    """The blocked child really cannot import torch (so the test above proves something)."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
