"""Packaging for patchddm_fast.

Requirement ranges are chosen so that a machine which already has the CPU build of
torch 2.13 installs nothing more for torch (an unpinned ``torch`` on a bare machine
would pull a multi-GB CUDA build).
"""
from setuptools import find_packages, setup

setup(
    name="patchddm_fast",
    version="0.1.0",
    description="Memory-optimised 3D denoising diffusion models for medical image segmentation (PatchDDM)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # csrc/ ships inside the wheel as patchddm_fast._csrc so the C++ CPU ops can be built
    # at first use from an installed package, not only from a checkout.
    packages=find_packages(include=["patchddm_fast", "patchddm_fast.*"]) + ["patchddm_fast._csrc"],
    package_dir={"patchddm_fast._csrc": "csrc"},
    package_data={"patchddm_fast._csrc": ["*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.0; platform_system=='Linux'",
        "ninja>=1.11",  # torch.utils.cpp_extension.load builds the C++ CPU kernels with it
        "numpy>=1.24",
        "nibabel>=5.0",
        "nvidia-ml-py>=12.0",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.6",
        "scipy>=1.10",  # connected components and dilation for the BraTS lesion-wise metrics
    ],
    extras_require={
        # MONAI is the independent reference the region metrics are tested against (torch>=2.8, numpy only).
        "test": ["pytest>=7", "pytest-benchmark>=4", "monai>=1.4"],
    },
    entry_points={"console_scripts": ["patchddm=patchddm_fast.cli.main:main"]},
)
