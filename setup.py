"""The package layout and the optional C extension (fusion.api._kernels). Metadata lives in
pyproject.toml.

The built-in plugins (``plugins/``) and the architecture data (``registry/``) sit at the top of
the repository and install as the sub-packages ``fusion.plugins`` and ``fusion.registry``.
The extension is optional: where it cannot be compiled (no C compiler), the install still
succeeds and fusion runs on its torch reference path (``fusion plugins`` says which is active).
"""

import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

# -ffp-contract=off: a multiply and an add fuse only where the torch reference fuses them (fmaf).
# -fvisibility=hidden: the sources call each other, but only PyInit__kernels is the module's.
args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
                                          "-std=c99", "-D_GNU_SOURCE", "-pthread", "-fvisibility=hidden"]
# One extension from every source in fusion/csrc, split by concern (compose.h lists what they compute).
csrc = Path("fusion/csrc")
mapped = {"fusion.plugins": "plugins", "fusion.registry": "registry"}
packages = find_packages(include=["fusion", "fusion.*"], exclude=["fusion.csrc"])
for name, folder in mapped.items():
    packages += [name] + [f"{name}.{p}" for p in find_packages(where=folder)]

setup(
    packages=packages,
    package_dir={"fusion": "fusion", **mapped},
    package_data={"fusion.registry": ["*.yaml", "chat_templates/*.jinja"]},
    exclude_package_data={"fusion": ["csrc/*"]},
    ext_modules=[Extension(
        "fusion.api._kernels",
        sources=sorted(str(p) for p in csrc.glob("*.c")),
        depends=sorted(str(p) for p in csrc.glob("*.h")),
        extra_compile_args=args,
        extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
        optional=True,
    )],
)
