"""jaxnmt: Transformer translation and language models in JAX."""

import setuptools

# The jax this project is developed and tested with; the TPU compiler is pinned to it
# (`jax[tpu]==X` brings the libtpu built for jax X: 0.10.2 brings libtpu 0.0.42.1).
JAX_VERSION = '0.10.2'
TPU_COMPILER = f'jax[tpu]=={JAX_VERSION}'

setuptools.setup(
    name='jaxnmt',
    version='0.1.0',
    description='Transformer translation and language-model training with JAX, Flax NNX, '
                'Grain and Orbax, from one CPU to a TPU pod.',
    packages=setuptools.find_packages(include=['jaxnmt', 'jaxnmt.*', 'configs']),
    python_requires='>=3.11',
    # Lower bounds are the versions this project is developed and tested with
    # (BUILD_NOTES.md): Flax 0.12's NNX API (nnx.List, out_sharding metadata) and
    # Grain 0.2's dataset API (MapDataset, ThreadPrefetchIterDataset) are relied on.
    install_requires=[
        f'jax>={JAX_VERSION}',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        # Shards of prepared data (ArrayRecord files, read and written by its reader and
        # writer).
        'array-record>=0.8.1',
        # .zst corpora.
        'zstandard>=0.22',
        'sentencepiece>=0.2.1',
        'ml-collections>=1.1.0',
        'tensorboardX>=2.6.2',
        'numpy>=2.0',
        'absl-py>=2.1.0',
        'sacrebleu>=2.4.0',
        'tqdm>=4.66',
        'matplotlib>=3.8',
        # --mode=export writes CTranslate2 models with its own spec API; --mode=import
        # reads Marian's YAML model config and vocabularies.
        'ctranslate2>=4.8',
        'pyyaml>=6.0',
        # bfloat16 arrays for a bfloat16 CTranslate2 export (JAX depends on it too).
        'ml-dtypes>=0.5',
    ],
    extras_require={
        # A workdir on Cloud Storage (gs://...): gcsfs, and with it google-cloud-storage,
        # which Orbax's GCS deletes and tensorboardX's gs:// writer use too.
        'gcs': ['gcsfs>=2026.10.1'],
        # --mode=compile: the TPU compiler (libtpu), to compile for TPU slices on a machine
        # without TPUs; installing it pins jax to JAX_VERSION, the release libtpu is built for.
        'tpu-compile': [TPU_COMPILER],
        # --mode=compile --topology=h100-N: the CUDA compiler as a library (the plugin and
        # its PJRT, without CUDA's own libraries: nothing runs on a GPU).
        'gpu-compile': [f'jax[cuda12-local]=={JAX_VERSION}'],
        # The gs:// tests run against a local GCS emulator (tests/gcs_emulator.py); the
        # TPU-compile tests need the TPU compiler (they fail under CI=true without it).
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'gcsfs>=2026.10.1',
                 'gcp-storage-emulator>=2026.7.19', TPU_COMPILER],
    },
)
