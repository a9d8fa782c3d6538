import pytest

from finetune.config import load_recipe, shipped_recipes
from finetune.errors import ConfigError


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.data.train and recipe.description
    assert recipe.task in ("vqa", "caption", "dialogue", "retrieval")


def test_shipped_recipes_cover_the_tasks():
    names = {p.relative_to(p.parents[1] if p.parent.name == "demo" else p.parent).as_posix() for p in shipped_recipes()}
    for name in ("vqa.yaml", "captioning.yaml", "dialogue.yaml", "retrieval.yaml", "classification.yaml",
                 "demo/vqa.yaml", "demo/captioning.yaml", "demo/dialogue.yaml", "demo/retrieval.yaml"):
        assert name in names


def test_overrides_are_typed():
    recipe = load_recipe("demo/vqa", ["adapter.r=4", "data.max_length=128", "train.learning_rate=1e-4",
                                      "model.quantization=4bit", "adapter.dropout=0"])
    assert recipe.adapter.r == 4 and recipe.data.max_length == 128
    assert recipe.train["learning_rate"] == 1e-4 and recipe.model.quantization == "4bit"
    assert recipe.adapter.dropout == 0.0 and isinstance(recipe.adapter.dropout, float)


def test_dict_overrides_and_dict_source():
    recipe = load_recipe({"data": {"train": "a.jsonl"}}, {"train.max_steps": 3, "output_dir": "x"})
    assert recipe.train == {"max_steps": 3} and recipe.output_dir == "x" and recipe.data.train == "a.jsonl"


@pytest.mark.parametrize("override, expected", [
    ("data.trian=x.jsonl", "did you mean data.train"),
    ("adapter.rank=8", "did you mean adapter.r"),
    ("train.learning_rat=1", "did you mean train.learning_rate"),
    ("modle.name=x", "did you mean model"),
    ("adapter.r=eight", "adapter.r must be int"),
    ("model.quantization=8bit", "model.quantization must be one of none, 4bit"),
    ("data.format=xml", "data.format must be one of"),
    ("adapter.lora=false", "nothing would train"),
    ("data.max_length", "is not KEY=VALUE"),
    ("data.train.x=1", "data.train is not a section"),
])
def test_mistakes_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_recipe("demo/vqa", [override])


def test_unknown_recipe_name_suggests_shipped_ones():
    with pytest.raises(ConfigError, match="did you mean demo/vqa"):
        load_recipe("demo/vq")


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)
