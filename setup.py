"""Native part of the build: the sparse-cpu kernels (plain C, C ABI, loaded with ctypes).

Everything else is declared in pyproject.toml. The library needs only a C compiler and pthreads; it picks
its instruction set at run time, so it is built without -march flags and runs on any CPU of the target
architecture (x86-64 with AVX-512 / AVX2+FMA / neither, ARM, ...).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sparsedeploy.kernels._native",
            sources=["sparsedeploy/kernels/csrc/sparse_cpu.c"],
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden", "-pthread", "-Wall"],
            extra_link_args=["-pthread"],
            libraries=["m"],
        )
    ],
)
