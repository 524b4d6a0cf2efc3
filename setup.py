"""Build script: the Python package always; the CUDA extension `fast_attention._C` when nvcc is found.

The CUDA build is described in csrc/README.md. Without nvcc, or with FAST_ATTENTION_SKIP_CUDA=1, the package
installs without it and runs on its Triton and reference backends.
"""
import os
import shutil

from setuptools import setup


def _nvcc():
    if os.environ.get("FAST_ATTENTION_SKIP_CUDA", "0") == "1":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def _extensions():
    nvcc = _nvcc()
    if nvcc is None or not os.path.exists(os.path.join("csrc", "bindings.cpp")):
        print("fast_attention: building without the CUDA extension (no nvcc, or FAST_ATTENTION_SKIP_CUDA=1)")
        return {}, []
    return _cuda_extension(nvcc)


def _cuda_arch_flags():
    """nvcc -gencode flags from TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0a", "8.6+PTX"; default sm_80 and sm_90):
    machine code for each arch, plus PTX of the highest (and of any marked +PTX) for newer GPUs."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
    archs, ptx = [], set()
    for token in spec.replace(",", ";").replace(" ", ";").split(";"):
        if not token:
            continue
        with_ptx = token.endswith("+PTX")
        name = token.removesuffix("+PTX")
        digits = name.rstrip("af")
        try:
            major, minor = (int(x) for x in digits.split("."))
        except ValueError:
            raise SystemExit(f"fast_attention: TORCH_CUDA_ARCH_LIST entry {token!r} is not of the form 8.0, 9.0a "
                             f"or 8.6+PTX") from None
        if major < 8:
            raise SystemExit(f"fast_attention: TORCH_CUDA_ARCH_LIST entry {token!r}: the CUDA kernels need sm_80 or "
                             f"newer (cp.async, bf16 mma.sync)")
        arch = f"{major}{minor}{name[len(digits):]}"
        archs.append(arch)
        if with_ptx:
            ptx.add(arch)
    ptx.add(max(archs, key=lambda a: int(a.rstrip("af"))))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{a},code=compute_{a}" for a in sorted(ptx)]


def _write_ninja(path, nvcc, flags, units):
    """One nvcc rule and one build line per .cu file, so ninja compiles them in parallel."""
    quote = lambda s: s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
    lines = ["ninja_required_version = 1.3", f"nvcc = {quote(nvcc)}", f"flags = {' '.join(flags)}", "",
             "rule nvcc", "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out", "  depfile = $out.d",
             "  deps = gcc", "  description = nvcc $in", ""]
    lines += [f"build {quote(obj)}: nvcc {quote(src)}" for src, obj in units]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _stream_source(include_dirs):
    """How the binding gets the current CUDA stream from torch's headers: "native_handle" (c10::Stream's, torch
    >= 2.11: no CUDA headers of torch's own needed, so torch's CPU wheel is enough), "c10_cuda" (older torch's CUDA
    wheels: c10::cuda::getCurrentCUDAStream, linking libc10_cuda), or None (older torch's CPU wheel)."""
    def header(path):
        for include in include_dirs:
            if os.path.exists(os.path.join(include, path)):
                with open(os.path.join(include, path)) as f:
                    return f.read()
        return ""
    if "native_handle" in header(os.path.join("c10", "core", "Stream.h")):
        return "native_handle"
    if header(os.path.join("c10", "cuda", "CUDAStream.h")):
        return "c10_cuda"
    return None


def _cuda_extension(nvcc):
    """fast_attention._C: csrc/**/*.cu compiled by nvcc to objects (through ninja, in parallel), linked into the
    pybind11 binding csrc/bindings.cpp, which the host compiler builds against torch's headers. The kernels
    include only CUDA headers, so torch's CPU wheel (no c10/cuda headers) is enough to build."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fast_attention: torch is not importable at build time (build isolation? use "
              "--no-build-isolation); installing without the CUDA extension")
        return {}, []
    stream_source = _stream_source(cpp_extension.include_paths())
    if stream_source is None:
        print(f"fast_attention: torch {torch.__version__} has neither c10::Stream::native_handle (new in torch 2.11) "
              f"nor the c10/cuda headers of its CUDA wheels, so the binding cannot find the current CUDA stream; "
              f"installing without the CUDA extension")
        return {}, []
    import glob
    import subprocess
    import sys

    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "csrc")
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    cuda_lib = next((d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"))
                     if os.path.isdir(d)), os.path.join(cuda_home, "lib64"))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    nvcc_flags = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                  abi, f"-I{csrc}", *_cuda_arch_flags()]
    try:
        pybind11_abi = cpp_extension._get_pybind11_abi_build_flags()  # so our pybind11 types match torch's
    except AttributeError:
        pybind11_abi = []
    # torch < 2.11 escapes the quotes for a shell (-DPYBIND11_COMPILER_TYPE=\\"_gcc\\"); setuptools uses none
    pybind11_abi = [flag.replace('\\"', '"') for flag in pybind11_abi]
    stream_flags, stream_includes, stream_libraries = [], [], []
    if stream_source == "c10_cuda":
        stream_flags, stream_includes, stream_libraries = (["-DFA_STREAM_FROM_C10_CUDA"],
                                                           [os.path.join(cuda_home, "include")], ["c10_cuda"])

    class BuildExt(build_ext):
        def build_extensions(self):
            build_dir = os.path.abspath(os.path.join(self.build_temp, "fast_attention_cuda"))
            units = []
            for src in sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)):
                obj = os.path.join(build_dir, os.path.relpath(src, csrc)[:-3] + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                units.append((src, obj))
            ninja_file = os.path.join(build_dir, "build.ninja")
            _write_ninja(ninja_file, nvcc, nvcc_flags, units)
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            print(f"fast_attention: compiling {len(units)} CUDA units with {nvcc} ({jobs} jobs)", flush=True)
            ninja = shutil.which("ninja") or os.path.join(os.path.dirname(sys.executable), "ninja")
            subprocess.run([ninja, "-C", build_dir, "-f", "build.ninja", "-j", jobs], check=True)
            for ext in self.extensions:
                ext.extra_objects = [obj for _, obj in units] + list(ext.extra_objects or [])
            super().build_extensions()

    ext = Extension(
        "fast_attention._C",
        sources=["csrc/bindings.cpp"],
        include_dirs=[csrc, *cpp_extension.include_paths(), *stream_includes],
        library_dirs=[cuda_lib, torch_lib],
        libraries=["cudart", "c10", *stream_libraries, "torch", "torch_cpu", "torch_python"],
        runtime_library_dirs=[cuda_lib, torch_lib],
        extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden", abi, "-DTORCH_EXTENSION_NAME=_C",
                            "-DTORCH_API_INCLUDE_EXTENSION_H", *pybind11_abi, *stream_flags],
        language="c++",
    )
    return {"build_ext": BuildExt}, [ext]


cmdclass, ext_modules = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
