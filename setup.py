"""Packages and package data that pyproject.toml cannot list statically: the Python packages, plus the config
groups (`configs/`) and the embedded corpus (`data/default/`), which stay at the clone's root where users edit
them and ship inside the wheel as `dataflex/_share/` (found by dataprep.tokenizer.share_root)."""
from setuptools import find_packages, setup

packages = find_packages(include=["dataflex", "dataflex.*", "dataprep", "dataprep.*"])
setup(
    packages=packages + ["dataflex._share.configs", "dataflex._share.data"],
    package_dir={"dataflex._share.configs": "configs", "dataflex._share.data": "data"},
    package_data={"dataflex": ["py.typed"], "dataflex._share.configs": ["*.yaml", "**/*.yaml"],
                  "dataflex._share.data": ["default/*", "default/**/*"]},
    include_package_data=False,
)
