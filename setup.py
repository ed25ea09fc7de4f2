"""Build script. Today fastrnn is pure Python; the C++ extension (csrc/) plugs in here."""
from setuptools import setup

setup()
