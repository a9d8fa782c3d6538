"""A plain (non-editable) install carries everything: recipes, templates and launch configs are package data."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("finetune-*.whl")
    return path


def test_the_wheel_holds_every_recipe_template_and_launch_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"finetune/recipes/{p.relative_to(ROOT / 'recipes').as_posix()}" for p in (ROOT / "recipes").rglob("*.yaml")}
    assert shipped and shipped <= names
    templates = {f"finetune/templates/{p.name}" for p in (ROOT / "finetune" / "templates").iterdir()}
    assert templates and templates <= names
    configs = {f"finetune/launch_configs/{p.name}" for p in (ROOT / "finetune" / "launch_configs").glob("*.yaml")}
    assert configs and configs <= names


def test_a_fresh_venv_lists_recipes_and_launch_configs_from_the_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The wheel alone goes into the new venv; its dependencies are borrowed from this one through PYTHONPATH
    # (whose .pth files, among them the editable install of the checkout, are not processed there).
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300, env=clean)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(python), "-c", "import finetune; print(finetune.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, check=True)
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the installed copy, not the checkout
    listing = subprocess.run([str(venv / "bin" / "finetune"), "recipes"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, check=False)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "demo/vqa" in listing.stdout and "captioning" in listing.stdout
    code = "from finetune.config import load_recipe; print(load_recipe('demo/vqa').model.name)"
    loaded = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            check=False)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "tiny-llava", loaded.stderr[-2000:]
    configs = subprocess.run([str(venv / "bin" / "finetune"), "configs"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, check=False)
    assert configs.returncode == 0, configs.stderr[-2000:]
    paths = [Path(line.split()[-1]) for line in configs.stdout.strip().splitlines()]
    assert [p.stem for p in paths] == ["ddp", "fsdp", "zero2", "zero3"]
    assert all(p.is_file() and p.is_relative_to(venv) for p in paths)  # the wheel's copies
