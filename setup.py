"""Only what pyproject.toml cannot say: the cffi extension (cffi_ext/build.py), compiled by
``pip install`` and by the editable ``pip install -e .`` alike."""

from setuptools import setup

setup(cffi_modules=["cffi_ext/build.py:ffibuilder"])
