"""Ship twisted/plugins/mailappliance_plugin.py as a plain module in the twisted.plugins namespace,
and build the optional C helper mailappliance_fileops.

twisted/plugins must not be a regular package of ours (no __init__.py): setuptools' find_packages
would not see it, so it is listed explicitly in py_modules.

mailappliance_fileops (source: mailappliance/_fileops.c) runs a batch of file system calls with
the GIL released once. It is optional: without a C compiler and Python's headers the build skips
it and mailappliance.fileops.FileOps makes the same calls from Python (slower under load, same
results). Its source lives in the package's tree, but the module it builds is top-level, not
part of the package: the tests (CI: ``pip install .`` then ``python -m pytest`` in the clone)
import the package from the source checkout, whose mailappliance/ has no built helper in it; a
top-level module is still found in site-packages, a submodule of the package would not be.
The C source is not shipped as package data.
"""
from setuptools import Extension, setup

setup(
    py_modules=["twisted.plugins.mailappliance_plugin"],
    ext_modules=[Extension("mailappliance_fileops", ["mailappliance/_fileops.c"], optional=True)],
    exclude_package_data={"mailappliance": ["*.c"]},
)
