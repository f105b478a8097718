"""Build the C core `shmkit._native`; everything else is declared in pyproject.toml."""
import glob

from setuptools import Extension, setup

native = Extension(
    "shmkit._native",
    sources=sorted(glob.glob("src/shmkit/_native/*.c")),
    depends=glob.glob("src/shmkit/_native/*.h"),
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[native])
