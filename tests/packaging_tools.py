"""The repository's packaging/ scripts as modules for tests (packaging/ is not a package).

Importable from every test directory: pytest puts tests/ on the import path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def argparse_docs() -> ModuleType:
    """packaging/argparse_docs.py, the build-time generator of man pages and completion."""
    name = "varsd_argparse_docs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "packaging" / "argparse_docs.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {REPO / 'packaging' / 'argparse_docs.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
