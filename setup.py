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

_spec = importlib.util.spec_from_file_location("_fastrnn_build", os.path.join("fastrnn", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extension():
    """setup() arguments for fastrnn._C; none when torch is missing or FASTRNN_NO_EXT is set (the
    Makefile installs with it and then builds the extension once, in place, with build_ext --inplace)."""
    if os.environ.get("FASTRNN_NO_EXT"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # pure-Python install: the backend builds the extension on first use
        print("fastrnn: torch is not importable, skipping the C++ extension", file=sys.stderr)
        return {}
    sources = [os.path.join("csrc", s) for s in build.SOURCES]
    ext = CppExtension("fastrnn._C", sources, extra_compile_args={"cxx": build.cxx_flags()},
                       extra_link_args=build.ld_flags())
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


setup(**extension())
