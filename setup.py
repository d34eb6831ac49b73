"""flaxlm: the whole LLM pipeline in JAX/Flax (tokenizer, pretraining, SFT, reward model,
RLHF, generation), sharded over a device mesh."""

from setuptools import setup

# Lower bounds are the versions this repository is tested with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6.5",
    "sentencepiece>=0.2.3",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "absl-py>=2.5.1",
    "matplotlib>=3.11",  # the pipeline's and sweeps' report plots
    "gguf>=0.19",  # llama.cpp's GGUF files (numpy only): flaxlm import-gguf
    # tensorflow-datasets imports it for builders defined in packages but declares it
    # only for Python < 3.9.
    "importlib-resources>=7.1.0",
]

EXTRAS = {
    # nbclient, nbformat and ipykernel execute notebooks/quickstart.ipynb in the tests.
    "test": [
        "pytest>=9.0",
        # the README's test command runs the suite on 2 workers (-n 2)
        "pytest-xdist>=3.8",
        "ruff>=0.17",
        "scipy>=1.13",
        "nbclient>=0.11",
        "nbformat>=5.11",
        "ipykernel>=7.4",
        # drives the system Chromium (/usr/bin/chromium + chromedriver) in the label page test
        "selenium>=4.51",
    ],
    # torch==2.13.0 is the CPU build; any newer pin pulls a multi-GB CUDA build.
    "hf": ["torch==2.13.0", "transformers>=5.24", "safetensors>=0.8", "tokenizers>=0.23"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "gpu": ["jax[cuda12]>=0.10.2"],
}

setup(
    name="flaxlm",
    version="0.1.0",
    description=__doc__.strip().splitlines()[0],
    python_requires=">=3.11",
    packages=[
        "model",
        "train",
        "train.data",
        "rlhf",
        "orchestrate",
        "configs",
        "configs.ablations",
    ],
    package_data={
        "rlhf": ["label_page/*.html", "label_page/*.js", "label_page/*.css"],
        "model": ["cpu_kernels.cc"],  # compiled on first use (model/cpu_kernels.py)
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["flaxlm=orchestrate.cli:main"]},
)
