"""Build hook: generate the gRPC stubs from proto/ before packaging (config is in pyproject.toml)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self):
        runpy.run_path(str(Path(__file__).parent / "proto" / "generate.py"), run_name="generate")[
            "generate"
        ]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
