"""embedspace: learning and measuring embedding spaces in JAX/Flax."""

import setuptools

setuptools.setup(
    name="embedspace",
    version="0.1.0",
    description="Learning and measuring embedding spaces (SSL and multimodal) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["embedspace", "embedspace.*"]),
    package_data={"embedspace": ["py.typed"], "embedspace.data": ["assets/*/*"],
                  "embedspace.space": ["assets/pretrained/**/*"],
                  "embedspace.multimodal": ["assets/*/*"]},
    include_package_data=True,
    entry_points={"console_scripts": [
        "embedspace-train=embedspace.main:run",
        "embedspace-evaluate=embedspace.evaluate:run",
        "embedspace-embed=embedspace.embed:run",
        "embedspace-search=embedspace.search:run",
    ]},
    # Lower bounds are the versions verified on Python 3.11 (see ../shared/STACK.md).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "array_record>=0.8.6",
        "ml_collections>=1.1.0",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "numpy>=2.0",
        "tensorboardX>=2.6.5",
        "tqdm>=4.66",
        "matplotlib>=3.9",
        "scipy>=1.11",  # audio: scipy.io.wavfile and the polyphase resampler
        "etils[epath]>=1.7",  # workdirs as epath.Path (local or gs://)
    ],
    extras_require={
        # t-SNE maps in the evaluation report; without it they are skipped with a note.
        "tsne": ["scikit-learn>=1.5"],
        # Embeddings as a faiss index (python -m embedspace.search --faiss_index=PATH).
        "faiss": ["faiss-cpu>=1.15"],
        # Side-by-side benchmarks (python -m benchmarks.run_all): the PyTorch reference stack.
        # pip resolves torch to the large CUDA build; it runs on the CPU as well.
        "bench": [
            "torch>=2.14.1",
            "torchvision>=0.29.1",
            "lightly>=1.6.0",
            "scikit-learn>=1.9.1",
            "faiss-cpu>=1.15.1",
        ],
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.8",
            "hypothesis>=6.100",
            # tests/test_notebooks.py runs experiments/*.ipynb in a kernel.
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # tests/conftest.py: pytest-xdist workers share the smoke workdirs they train once.
            "filelock>=3.12",
        ],
    },
)
