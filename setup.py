from setuptools import find_packages, setup

setup(
    name="paft-engine",
    version="0.1.0",
    description="A small, teaching-grade LLM fine-tuning engine: LoRA/QLoRA, SFT, DPO, sparse merging",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "merge", "merge.*",
                                    "evals", "evals.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=5.0",
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
                 "lm-eval==0.4.13"],  # the reference evals.mc must agree with (tests/test_lm_eval_agreement.py)
    },
)
