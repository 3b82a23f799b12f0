"""Loading a model by name: what every command's MODEL argument accepts
(``convc export``, ``run``, ``compile``, ``passes``, ``tune``, ``quantize``,
``explain``). The ONNX importer is imported only for ``.onnx`` files, so this
module and :mod:`convc.onnx` do not import each other at import time.

>>> g = load_model("lenet5")                 # doctest: +SKIP
>>> g = load_model("model.onnx", {"x": (1, 3, 224, 224)})   # doctest: +SKIP
"""
from __future__ import annotations

import runpy
from pathlib import Path

from .errors import ConvcError
from .ir import Graph


def load_model(spec: str, input_shapes: dict | None = None) -> Graph:
    """The graph named by ``spec``: a builder in :mod:`convc.models`
    (``lenet5``, ``mobilenet_tiny``), an ONNX file (``.onnx``, to the ONNX
    importer), or a Python source file (``.py``, a regular file, not a zip
    archive) that defines ``build()`` returning a :class:`Graph`, or a
    module-level ``graph``. Nothing else is run: any other file (``.pb``,
    ``.npy``, ``model.onnx.bak``, a zip or a directory with ``__main__.py``)
    is a :class:`ConvcError` that lists what is accepted. ``input_shapes``
    (ONNX files only): static shapes for inputs with symbolic dims."""
    import zipfile

    if str(spec).lower().endswith(".onnx"):
        from .onnx import from_onnx
        return from_onnx(spec, input_shapes=input_shapes)
    from . import models

    bundled = {n: f for n, f in vars(models).items()
               if callable(f) and not n.startswith("_") and getattr(f, "__module__", "") == models.__name__}
    if spec in bundled:
        return _checked(bundled[spec](), f"convc.models.{spec}()")
    accepted = (f"a bundled model name ({', '.join(sorted(bundled))}), an ONNX file (*.onnx) or a Python file "
                f"(*.py) defining build() -> Graph or a module-level `graph`")
    path = Path(spec)
    if path.suffix.lower() != ".py":
        if not path.exists():
            raise ConvcError(f"model {spec!r}: not a bundled model name and no such file; give {accepted}")
        raise ConvcError(f"model {spec!r}: {'a directory' if path.is_dir() else 'a file'} convc does not load "
                         f"(only *.py files are run as Python, only *.onnx files imported); give {accepted}")
    if not path.exists():
        raise ConvcError(f"model {spec!r}: no such file; give {accepted}")
    if not path.is_file():
        raise ConvcError(f"model {spec!r}: not a regular file (a directory?); give {accepted}")
    if zipfile.is_zipfile(path):
        raise ConvcError(f"model {spec!r}: a zip archive, not Python source; convc does not run archives; "
                         f"give {accepted}")
    try:
        ns = runpy.run_path(str(path), run_name="__convc_model__")
    except ConvcError:
        raise
    except Exception as e:                      # the user's file: report, don't crash
        raise ConvcError(f"model {spec}: running it raised {type(e).__name__}: {e}") from e
    if callable(ns.get("build")):
        try:
            return _checked(ns["build"](), f"{spec}: build()")
        except ConvcError:
            raise
        except Exception as e:
            raise ConvcError(f"model {spec}: build() raised {type(e).__name__}: {e}") from e
    if "graph" in ns:
        return _checked(ns["graph"], f"{spec}: graph")
    raise ConvcError(f"model {spec}: defines neither build() nor a module-level `graph`")


def _checked(g, what) -> Graph:
    if not isinstance(g, Graph):
        raise ConvcError(f"{what} must be a convc.Graph, got {type(g).__name__}")
    return g


