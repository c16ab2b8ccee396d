"""Ship twisted/plugins/mailappliance_plugin.py as a plain module in the twisted.plugins namespace,
and build the optional C helper mailappliance_fileops.

twisted/plugins must not be a regular package of ours (no __init__.py): setuptools' find_packages
would not see it, so it is listed explicitly in py_modules.

mailappliance_fileops (mailappliance_fileops.c) runs a batch of file system calls with the GIL
released once. It is optional: without a C compiler and Python's headers the build skips it and
mailappliance.queue.store.FileOps makes the same calls from Python (slower under load, same
results). It is a top-level module, not part of the package, so that it is found in
site-packages even when the tests import the package from a source checkout.
"""
from setuptools import Extension, setup

setup(
    py_modules=["twisted.plugins.mailappliance_plugin"],
    ext_modules=[Extension("mailappliance_fileops", ["mailappliance_fileops.c"], optional=True)],
)
