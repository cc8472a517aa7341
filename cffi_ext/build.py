"""cffi build script (API mode) for ``cffi_ext._slicefab``, the firmware's C fast path.

``setup.py`` hands ``ffibuilder`` to setuptools (``cffi_modules``), so ``pip install .`` and
the editable ``pip install -e .`` compile it; nothing is built by hand. The declarations come
from one place, ``cffi_ext/include/slicefab_fast.h``: the part between its ``cdef-begin`` and
``cdef-end`` markers is what cffi is told (cdef does not run the preprocessor). The C sources
include the register header generated from ``rtl/regmap/slicefab_xbar.rdl``.

After a C edit, ``make fastpath`` rebuilds it in place (the Makefile tracks the sources);
``make sanitize`` builds the same sources with ASan+UBSan (``cffi_ext/Makefile``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
API_HEADER = HERE / "include" / "slicefab_fast.h"
SOURCES = ("xbar_image.c", "cores.c", "lanes.c", "extents.c", "alloc.c", "doorbell.c")
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wconversion", "-Wno-sign-conversion"]


def cdef_text(header: Path = API_HEADER) -> str:
    """The declarations between the markers of the API header."""
    text = header.read_text(encoding="utf-8")
    begin, end = "/* cdef-begin */", "/* cdef-end */"
    if begin not in text or end not in text:
        raise RuntimeError(f"{header}: missing {begin} / {end} markers")
    return text.split(begin, 1)[1].split(end, 1)[0]


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to the project root."""
    return os.path.relpath(path, ROOT)


#: ASan + UBSan, every finding fatal (``make sanitize``)
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def make_ffi(module: str = "cffi_ext._slicefab", sanitize: bool = False) -> FFI:
    """The builder of ``module`` from the fast-path sources (optionally sanitized)."""
    flags = [*CFLAGS, f"-I{HERE / 'include'}"]
    if sanitize:
        flags = [*(f for f in flags if f != "-O2"), "-O1", "-g", *SANITIZE]
    builder = FFI()
    builder.cdef(cdef_text())
    builder.set_source(
        module,
        '#include "slicefab_fast.h"\n',
        sources=[_rel(HERE / "src" / name) for name in SOURCES],
        include_dirs=[_rel(HERE / "include"), _rel(HERE / "src")],
        extra_compile_args=flags,
        extra_link_args=SANITIZE if sanitize else [],
    )
    return builder


ffibuilder = make_ffi()

if __name__ == "__main__":
    # `make sanitize` only: cffi_ext/_slicefab_asan*.so, which the Python tests load with
    # SLICEFAB_FASTPATH_MODULE=cffi_ext._slicefab_asan and the sanitizer runtimes preloaded.
    import sys

    if sys.argv[1:] != ["--sanitize"]:
        sys.exit("usage: python cffi_ext/build.py --sanitize  (pip install builds the release)")
    os.chdir(ROOT)
    make_ffi("cffi_ext._slicefab_asan", sanitize=True).compile(tmpdir=".", verbose=False)
