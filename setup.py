"""ml-ecs: JAX/Flax implementation of ML-ECS, collaborative multimodal edge-cloud learning."""
from setuptools import find_packages, setup

setup(
    name='ml-ecs',
    version='0.1.0',
    description='ML-ECS: collaborative multimodal learning for edge-cloud synergies, in JAX/Flax',
    python_requires='>=3.11',
    packages=find_packages(include=['ml_ecs', 'ml_ecs.*', 'configs']),
    package_data={'ml_ecs.data': ['*.npz']},
    # The main job from any directory: `ml-ecs-train --config=tiny --workdir=/tmp/run` (the packaged
    # configs by name, or any config file's path).
    entry_points={'console_scripts': ['ml-ecs-train = ml_ecs.run.train_cli:run']},
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
        # TensorBoard event files without TensorFlow: 0.7 MB (+ protobuf, already pulled in).
        'tensorboardX>=2.6,<3',
        # Privacy accounting of central DP (ml_ecs/aggregation/privacy.py): 1.5 MB + dm-tree 0.6 MB + mpmath 5.5 MB
        # (scipy, attrs and numpy are already pulled in by jax / others).
        'dp-accounting>=0.6,<0.7',
    ],
    extras_require={
        # Importing/exporting Hugging Face GPT-2-family checkpoints and PEFT adapters
        # (ml_ecs.backbones.hf_gpt2, ml_ecs.backbones.peft_io); no torch needed.
        'hf': ['transformers>=4.45,<6', 'safetensors>=0.4,<1'],
        # The hf/tfds dataset sources of ml_ecs/data/loaders.py (no TensorFlow: TFDS reads
        # array_record with numpy; importlib_resources is a TFDS import it does not declare).
        'data': ['datasets>=4,<6', 'pyarrow>=15', 'tensorflow-datasets>=4.9.4,<5', 'array-record>=0.5',
                 'importlib_resources>=6'],
        # What colab/quickstart.ipynb imports beyond the package (its tables), and a kernel to run it.
        'notebook': ['pandas>=2.1,<4', 'ipykernel>=6.29,<8'],
        # pytest 9.2 keeps node ids where pytest-xdist 3.8 cannot tag them with their xdist_group, so
        # --dist loadgroup stops grouping (shared runs would be made once per worker): below 9.2.
        'test': ['pytest>=8,<9.2', 'pytest-xdist>=3.5,<4', 'pandas>=2.1,<4',
                 'tensorboard>=2.15,<3',   # its event reader, to check the events we write
                 'nbformat>=5.9,<6', 'nbclient>=0.10,<1', 'ipykernel>=6.29,<8',   # running the notebook
                 'drjax==0.2.1'],          # the DrJAX round variant of the benchmark (needs jax only)
        'bench': ['flwr>=1.10,<2', 'drjax==0.2.1'],
    },
)
