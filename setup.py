"""Ship twisted/plugins/mailappliance_plugin.py as a plain module in the twisted.plugins namespace,
and build the optional C helper mailappliance._fileops.

twisted/plugins must not be a regular package of ours (no __init__.py): setuptools' find_packages
would not see it, so it is listed explicitly in py_modules.

mailappliance._fileops (mailappliance/_fileops.c) runs a batch of file system calls with the GIL
released once. It is optional: without a C compiler and Python's headers the build skips it and
mailappliance.queue.store.FileOps does the same calls from Python (slower under load, same
results).
"""
from setuptools import Extension, setup

setup(
    py_modules=["twisted.plugins.mailappliance_plugin"],
    ext_modules=[Extension("mailappliance._fileops", ["mailappliance/_fileops.c"],
                           optional=True)],
)
