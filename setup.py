"""Packages: micl's code, and the data folders of the repository layout (micl/utils/resources.py) as the
packages micl.resources.<folder>, mapped onto the folders themselves so that each file exists once. The rest
of the build configuration is in pyproject.toml."""

from setuptools import find_packages, setup

RESOURCES = {"micl.resources." + folder.replace("/", "."): folder
             for folder in ("prompts", "eval", "recipes/accelerate", "recipes/deepspeed")}

setup(packages=find_packages(include=["micl", "micl.*"]) + list(RESOURCES), package_dir=RESOURCES)
