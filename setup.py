"""ml-ecs: JAX/Flax implementation of ML-ECS, collaborative multimodal edge-cloud learning."""
from setuptools import find_packages, setup

setup(
    name='ml-ecs',
    version='0.1.0',
    description='ML-ECS: collaborative multimodal learning for edge-cloud synergies, in JAX/Flax',
    python_requires='>=3.11',
    packages=find_packages(include=['ml_ecs', 'ml_ecs.*']),
    package_data={'ml_ecs.data': ['*.npz']},
    install_requires=[
        'jax>=0.7,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.5,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'ml-collections>=1.0,<2',
        'absl-py>=2.1,<3',
        'rouge-score>=0.1.2,<0.2',
        'tokenizers>=0.20,<0.24',
        'numpy>=1.26,<3',
        'tqdm>=4.66,<5',
        'matplotlib>=3.8,<4',
    ],
    extras_require={
        # Reading Hugging Face checkpoints/tokenizers and dataset files a user already has;
        # heavy (torch/tensorflow-sized) and not needed by the main job or the tests.
        'loaders': ['transformers>=4.45,<6', 'datasets>=3,<5', 'tensorflow-datasets>=4.9,<5'],
        # Importing/exporting Hugging Face GPT-2-family checkpoints and PEFT adapters
        # (ml_ecs.models.hf_gpt2, ml_ecs.peft_io); no torch needed.
        'hf': ['transformers>=4.45,<6', 'safetensors>=0.4,<1'],
        'test': ['pytest>=8,<10', 'pytest-xdist>=3.5,<4'],
        'bench': ['flwr>=1.10,<2'],
    },
)
