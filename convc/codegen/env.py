"""The one Jinja environment and the C identifier rules."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2

CTYPES = {"float32": "float", "float64": "double", "int64": "int64_t"}
CL_TYPES = {"float32": "float", "float64": "double", "int64": "long"}     # OpenCL C spellings

_C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for
goto if inline int long register restrict return short signed sizeof static struct switch typedef union
unsigned void volatile while""".split())


def template_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    # Installed wheel: convc/templates. Source checkout: <repo>/templates.
    return [p for p in (here / "templates", here.parent / "templates") if p.is_dir()]


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    dirs = template_dirs()
    if not dirs:
        raise RuntimeError("convc templates not found: the package is installed without its templates/")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["cfloat"] = cfloat
    return env


def cfloat(v, ctype="float") -> str:
    """A float literal C reads back exactly (repr round-trips)."""
    v = float(v)
    if v != v:
        return "NAN"
    if v in (float("inf"), float("-inf")):
        return "INFINITY" if v > 0 else "-INFINITY"
    text = repr(v)
    if "e" not in text and "." not in text:
        text += ".0"
    return text + ("f" if ctype == "float" else "")


class Namer:
    """Unique, readable C identifiers derived from node names."""

    def __init__(self, reserved=()):
        self.used: set[str] = set(reserved)

    def __call__(self, name: str, prefix: str = "") -> str:
        base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)
        if base[0].isdigit() or base in _C_KEYWORDS:
            base = "_" + base
        ident, i = base, 1
        while ident in self.used:
            i += 1
            ident = f"{base}_{i}"
        self.used.add(ident)
        return ident
