"""Package discovery (the rest of the metadata is in pyproject.toml).

The library is ``mlxllm/``; ``convert/``, ``quant/`` and ``cli/`` sit at the repository root but
install inside it as ``mlxllm.convert``, ``mlxllm.quant`` and ``mlxllm.cli``. Every package under
those folders is found here, never listed by hand, so a new subpackage cannot be left out of the
wheel.
"""

from setuptools import find_packages, setup

ROOT_PARTS = ("convert", "quant", "cli")  # folder name == name under mlxllm

packages = find_packages(include=["mlxllm", "mlxllm.*"])
package_dir = {}
for part in ROOT_PARTS:
    packages += [f"mlxllm.{part}"]
    packages += [f"mlxllm.{part}.{sub}" for sub in find_packages(where=part)]
    package_dir[f"mlxllm.{part}"] = part

setup(packages=packages, package_dir=package_dir)
