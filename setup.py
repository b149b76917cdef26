"""beamcap: caption images in Apache Beam pipelines with Hugging Face image-to-text models."""

from setuptools import find_packages, setup

setup(
    name="beamcap",
    version="0.1.0",
    description="Apache Beam transforms that caption images with Hugging Face image-to-text models "
    "(a port of Data-Juicer's image_captioning_mapper)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["beamcap", "beamcap.*", "pipelines", "pipelines.*"]),
    package_data={"beamcap.demo": ["model/*", "data/*", "data/images/*"]},
    include_package_data=True,
    install_requires=[
        "apache-beam>=2.60,<3",
        "transformers>=5.0,<6",
        "torch>=2.4",
        "pillow>=10",
        "simhash>=2.1,<3",
        "numpy",
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]>=2.60,<3"],
        "dev": ["pytest", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "beamcap-caption=pipelines.cli:main",
            "beamcap-flink=pipelines.flink_cluster:main",
        ]
    },
)
