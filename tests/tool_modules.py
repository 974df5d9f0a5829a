"""Command-line scripts (tools/*.py, tools/gpu_kit/*.py) loaded as modules, so that tests call
their main() in-process, exactly as `python tools/NAME.py ...` would run it."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")


def load_tool(name: str, folder: str = "tools"):
    """tools/NAME.py (or FOLDER/NAME.py, relative to the repository) as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
