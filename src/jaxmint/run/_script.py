"""Import an experiment script by path, as ``python script.py`` would."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_module(path: str | Path):
    """Import the experiment script at ``path`` and check it defines ``Config`` and ``build``.

    Like ``python script.py``, the script's folder is put first on ``sys.path``
    (and left there, since ``build`` may import lazily), so a helper module beside
    the script imports.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no experiment script at {path}")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"jaxmint_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for attr in ("Config", "build"):
        if not hasattr(module, attr):
            raise AttributeError(f"experiment {path} defines no {attr!r}")
    return module
