"""Ship twisted/plugins/mailappliance_plugin.py as a plain module in the twisted.plugins namespace.

twisted/plugins must not be a regular package of ours (no __init__.py): setuptools' find_packages
would not see it, so it is listed explicitly in py_modules.
"""
from setuptools import setup

setup(py_modules=["twisted.plugins.mailappliance_plugin"])
