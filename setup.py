"""The optional C extension (fusion._kernels). Metadata lives in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler), the install still
succeeds and fusion runs on its torch reference path (`fusion doctor` says which is active).
"""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-std=c99", "-D_GNU_SOURCE", "-pthread"]

setup(ext_modules=[Extension(
    "fusion._kernels",
    sources=["fusion/_kernels.c"],
    extra_compile_args=args,
    extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
    optional=True,
)])
