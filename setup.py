"""Build script: the C++ extension fastrnn._C (csrc/), built with torch.utils.cpp_extension and ninja.

The build imports torch, so install with ``pip install --no-build-isolation -e .`` (an isolated build
would pull a second torch). Without torch or a compiler the package installs without the extension,
and the cpp backend builds it on first use (or reports why it cannot). Sources and flags:
fastrnn/_build.py; FASTRNN_DEBUG_BUILD=1 for a debug build.
"""
import importlib.util
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastrnn"))
_spec = importlib.util.spec_from_file_location("_fastrnn_build", os.path.join("fastrnn", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
sys.path.pop(0)

kwargs = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch at build time: pure-Python install, the backend builds on first use
    print("fastrnn: torch is not importable, skipping the C++ extension", file=sys.stderr)
else:
    kwargs = dict(
        ext_modules=[CppExtension("fastrnn._C", [os.path.join("csrc", s) for s in build.SOURCES],
                                  extra_compile_args={"cxx": build.cxx_flags()},
                                  extra_link_args=build.ld_flags())],
        cmdclass={"build_ext": BuildExtension},
    )

setup(**kwargs)
