"""The one Jinja environment and the C identifier rules."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2

CTYPES = {"float32": "float", "float64": "double", "int64": "int64_t", "int32": "int32_t", "int16": "int16_t",
          "int8": "int8_t", "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t",
          "uint64": "uint64_t"}
CL_TYPES = {"float32": "float", "float64": "double", "int64": "long", "int32": "int", "int16": "short",
            "int8": "char", "uint8": "uchar", "uint16": "ushort", "uint32": "uint", "uint64": "ulong"}     # OpenCL C spellings

_C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for
goto if inline int long register restrict return short signed sizeof static struct switch typedef union
unsigned void volatile while _Alignas _Alignof _Atomic _BitInt _Bool _Complex _Decimal32 _Decimal64
_Decimal128 _Generic _Imaginary _Noreturn _Static_assert _Thread_local alignas alignof bool constexpr false
nullptr static_assert thread_local true typeof typeof_unqual""".split())

# Lower-case names that the headers generated code includes (math.h, stddef.h,
# stdint.h, stdio.h, stdlib.h, string.h, time.h, CL/cl.h), gcc's GNU-mode
# predefines or the generated code itself define as object-like macros or use
# by name, where a variable of that name would break the translation unit.
# Function-like macros (isnan, offsetof) and functions are no problem: a
# variable shadows them.
_C_MACROS = set("""math_errhandling errno linux unix i386 complex imaginary noreturn assert stdin stdout
stderr""".split())


def reserved(ident: str) -> bool:
    """True if a variable called ``ident`` could clash with C or with what
    convc's generated code defines: a keyword (C89 to C23); an identifier C
    reserves (``_`` then an upper-case letter or ``_``); a typedef-like
    ``*_t`` name (``uintptr_t``, ``size_t``; POSIX reserves the suffix); an
    upper-case name, the spelling of the standard's and convc's macros
    (``NULL``, ``NAN``, ``INFINITY``, ``EOF``, ``INT64_C``, ``CONVC_MR``); a
    name starting with ``convc_`` (the generated helpers); or one of the
    lower-case macros above."""
    return (ident in _C_KEYWORDS or ident in _C_MACROS or re.match(r"_[A-Z_]", ident) is not None
            or ident.endswith("_t") or re.fullmatch(r"[A-Z][A-Z0-9_]+", ident) is not None
            or ident.lower().startswith("convc_"))


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

    def __init__(self, reserved=(), mangle: bool = True):
        """``reserved``: names already taken. ``mangle``: give names C or
        the generated code reserve (``reserved()``) a prefix; off for names
        that are made unique by a prefix of their own (the export's size
        macros, ``MODEL_X_SIZE``)."""
        self.used: set[str] = set(reserved)
        self.mangle = mangle

    def __call__(self, name: str, prefix: str = "", fallback: str = "v_") -> str:
        """A fresh identifier for ``name`` after ``prefix``; a name C or the
        generated code reserves (``reserved``) gets ``fallback`` in front."""
        base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)
        if base[0].isdigit() or (self.mangle and reserved(base)):
            base = fallback + base
        ident, i = base, 1
        while ident in self.used:
            i += 1
            ident = f"{base}_{i}"
        self.used.add(ident)
        return ident
