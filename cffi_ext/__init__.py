"""The C fast path of the firmware, compiled through cffi (API mode) at ``pip install``.

``cffi_ext/build.py`` declares the extension module ``cffi_ext._slicefab`` from the C
sources in ``cffi_ext/src/`` and the API header ``cffi_ext/include/slicefab_fast.h``. The
firmware reaches it only through :mod:`firmware.fastpath`, which also keeps the pure-Python
reference selectable (``SLICEFAB_FASTPATH=0``). Design and figures: ``docs/fastpath.md``.
"""
