from setuptools import find_packages, setup

setup(
    name="paft-engine",
    version="0.1.0",
    description="A small, teaching-grade LLM fine-tuning engine: LoRA/QLoRA, SFT, DPO, sparse merging",
    # Tested on 3.11 (the lock) and 3.12 (the GPU image); the lock's numpy, pandas, scipy and
    # transformers need >= 3.11.
    python_requires=">=3.11",
    # Import names that cannot shadow what a user has: Hugging Face's `kernels` (which transformers
    # >= 5.25 imports) and OpenAI's `evals` are real packages, hence paft_kernels and paft_evals.
    # benchmarks/ is not installed: it runs from the repository root (python -m benchmarks.<name>).
    packages=find_packages(include=["engine", "engine.*", "paft_kernels", "paft_kernels.*", "merge", "merge.*",
                                    "paft_evals", "paft_evals.*"]),
    package_data={"paft_evals": ["data/*.jsonl"], "paft_kernels": ["routes/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        # 5.17 is the GPU image's; 5.25 is the first that requires Hugging Face's `kernels` package.
        # engine.models.enable_checkpointing and paft_evals.mc._cache_key bridge the renames in between.
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "numpy",
        "pyyaml",
        "tqdm",
        "gguf>=0.10",       # transformers reads GGUF checkpoints with it (SmolLM2 quickstart)
        "accelerate",       # ... and asks for accelerate when it loads one
        "matplotlib",       # loss curves and result plots
    ],
    extras_require={
        "bnb": ["bitsandbytes>=0.45"],
        "wandb": ["wandb"],
        # the peers the parity tests and benchmarks compare against
        "test": ["pytest", "hypothesis", "peft>=0.15", "trl>=0.20", "accelerate", "wandb", "bitsandbytes>=0.45",
                 "lm-eval==0.4.13"],  # the reference paft_evals.mc must agree with (tests/test_lm_eval_agreement.py)
    },
)
