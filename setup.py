"""One distribution: the disttrain, planner, offload and launch packages + the copy engine."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _ext_modules():
    """The copy engine, built at install when torch is importable (it always is under `make`,
    which installs torch first and builds without isolation): a `CUDAExtension` with the CUDA
    token-slice copies (csrc/*.cu + their binding, -DDISTTRAIN_WITH_CUDA) when torch has CUDA
    and nvcc exists, else the C++ engine alone (`CppExtension`; the binding compiles to
    nothing). Without a built module the runtime JIT-builds the same sources or falls back to
    Python threads, and says which it uses."""
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    nvcc = shutil.which("nvcc") or (CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").is_file())
    if torch.version.cuda and nvcc and cuda_sources:
        ext = CUDAExtension("offload._copy_engine", sources + cuda_sources,
                            define_macros=[("DISTTRAIN_WITH_CUDA", None)],
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        ext = CppExtension("offload._copy_engine", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="disttrain",
    version="0.1.0",
    description="Planner-driven training for long sequences and huge models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["disttrain*", "planner*", "offload*", "launch*"]),
    package_data={"disttrain": ["data/*.txt"]},
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "pydantic>=2.5",
        "pyyaml",
        "rich",
        "matplotlib",
        "pulp==3.3.2",
        "highspy",
    ],
    extras_require={
        "test": ["pytest", "transformers", "safetensors", "tokenizers", "datasets", "tensorboard"],
        # Hugging Face checkpoints, tokenizers and documents (`model.hf`, `data.kind: documents`)
        "hf": ["transformers", "safetensors", "tokenizers", "datasets"],
        "ray": ["ray[train]==2.60.0"],
        "gpu": ["nvidia-ml-py"],
        # the stacks a plan can be exported to (`disttrain plan --emit`) and benchmarked against
        "peers": ["deepspeed==0.19.8", "megatron-core==0.16.1"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["disttrain=disttrain.cli:main"]},
)
