# Type stub for the module cffi builds from cffi_ext/build.py (API mode). The C functions
# on `lib` are declared in cffi_ext/include/slicefab_fast.h; cffi gives them no Python
# types, so `lib` is Any and firmware/fastpath.py and firmware/resources/fast.py wrap it.
from typing import Any

import _cffi_backend

ffi: _cffi_backend.FFI
lib: Any
