"""Builds the Cython extensions in shoalmq/_native/; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_MODULES = ["hashing", "mqtt_codec", "ring", "segment", "topic_tree"]

extensions = [
    Extension(
        f"shoalmq._native.{name}",
        [f"shoalmq/_native/{name}.pyx"],
        extra_compile_args=["-O3"],
    )
    for name in NATIVE_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
