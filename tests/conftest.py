"""Shared fixtures: the embedded tiny checkpoint (pre-trained, cached), a random twin of it built in seconds,
and a synthetic image. Nothing here or in any test reaches a network."""

import os

import pytest

# Before huggingface_hub is imported anywhere: a Hub lookup fails at once instead of waiting on retries.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_path():
    """The pre-trained embedded tiny-llava (built once per cache, 1-2 minutes): for tests that need learning."""
    from finetune.demo.tiny import tiny_llava_path

    return tiny_llava_path()


@pytest.fixture(scope="session")
def random_tiny(tmp_path_factory):
    """tiny-llava's processor and architecture with random weights, built in seconds: for tests of processors,
    labels, loading, adapters and the mechanics of training."""
    from finetune.demo.tiny import build_tiny_llava

    folder = tmp_path_factory.mktemp("random-tiny-llava")
    build_tiny_llava(folder, pretrained=False)
    return folder


@pytest.fixture(scope="session")
def processor(random_tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(random_tiny)


@pytest.fixture
def shapes_image():
    from finetune.demo.synthetic import make_scenes, render

    return render(make_scenes(1, seed=0)[0])
