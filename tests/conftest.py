"""Shared fixtures: the embedded tiny checkpoint (built once, cached) and its processor."""

import pytest


@pytest.fixture(scope="session")
def tiny_path():
    from finetune.tiny import tiny_llava_path

    return tiny_llava_path()


@pytest.fixture(scope="session")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture
def shapes_image():
    from finetune.data.synthetic import make_scenes, render

    return render(make_scenes(1, seed=0)[0])
