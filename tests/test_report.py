"""report.html: built from a run folder's files alone, opened in a real headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finetune.cli import main
from finetune.report import REPORT_NAME, select_examples, series, write_report

CHROMIUM = os.environ.get("FINETUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CARD = re.compile(r'<article class="card (\w+)"')


def make_run(root: Path, scores: list[float | None], before: bool = True, images: bool = True) -> Path:
    """A run folder as training + eval leave it: recipe, adapter config, trainer state (a resumed run's
    history), run_info, metrics before/after and per-example predictions with images on disk."""
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    pictures = root / "images"
    pictures.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "task": "vqa", "model": {"name": "tiny-llava", "quantization": "none"},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0}, "data": {"train": "my/train.jsonl", "eval": "my/val.jsonl"},
        "eval": {"report_examples": 200}, "train": {"learning_rate": 0.001, "num_train_epochs": 3}}))
    (run / "adapter_config.json").write_text(json.dumps({
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["a.q_proj", "a.v_proj"]}))
    history = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-3 * (1 - s / 100), "grad_norm": 1.0, "epoch": s / 40}
               for s in range(10, 101, 10)]
    history.insert(4, {"step": 50, "loss": 9.0, "learning_rate": 5e-4})  # logged before the kill, then resumed
    history += [{"step": s, "eval_loss": 1.0 / s, "eval_vqa_accuracy": s / 100, "eval_runtime": 1.0}
                for s in (50, 100)]
    history.append({"step": 100, "train_runtime": 75.5, "train_loss": 0.4, "total_flos": 1.0})
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 100, "epoch": 2.5, "log_history": history}))
    (run / "run_info.json").write_text(json.dumps({
        "trainable_parameters": 77312, "total_parameters": 766464, "seconds": 95.2, "hardware": "CPU (2 cores)",
        "started": "2026-11-26T10:00:00+00:00", "finetune_version": "0.1.0", "torch_version": "2.13.0",
        "transformers_version": "5.24.0"}))
    (run / "eval" / "metrics.json").write_text(json.dumps({"vqa_accuracy": 0.75, "examples": len(scores),
                                                           "examples_per_second": 12.5, "dataset": "my/val.jsonl"}))
    rows = []
    for i, score in enumerate(scores):
        path = pictures / f"{i}.png"
        Image.new("RGB", (320, 200), (40 * (i % 6), 90, 160)).save(path)
        row = {"id": f"q{i}", "prompt": f"<image>\nQuestion {i}?", "prediction": f"answer {i}",
               "references": [f"ref {i}", "other"],
               "messages": [{"role": "user", "content": f"<image>\nQuestion {i}?"}]}
        if images:
            row["images"] = [str(path)]
        if score is not None:
            row["score"] = score
        rows.append(row)
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if before:
        (run / "eval-before").mkdir()
        (run / "eval-before" / "metrics.json").write_text(json.dumps({"vqa_accuracy": 0.25, "examples": len(scores)}))
        (run / "eval-before" / "predictions.jsonl").write_text(
            "".join(json.dumps({"id": f"q{i}", "prediction": f"old {i}", "score": 0.0}) + "\n"
                    for i in range(len(scores))))
    return run


SCORES = [1.0, 0.0, 0.6, 1.0, 0.3, 1.0, 1.0, 0.0, 1.0, 1.0]  # 0.0, 0.0, 0.3 are wrong (< 0.5)


def cards(html: str) -> list[str]:
    return CARD.findall(html)


def test_report_is_one_self_contained_file(tmp_path):
    path = write_report(make_run(tmp_path, SCORES))
    html = path.read_text()
    assert path.name == REPORT_NAME == "report.html"
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing loaded from a file or the network
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    assert html.count("data:image/jpeg;base64,") == len(SCORES)  # each image inlined once


def test_summary_names_what_was_trained_and_where(tmp_path):
    html = write_report(make_run(tmp_path, SCORES)).read_text()
    for text in ("tiny-llava", "my/train.jsonl", "my/val.jsonl", "LoRA r=16, alpha=32, dropout=0.0 on 2 layers",
                 "77,312 of 766,464 (10.09%)", "1 min 35 s in all, 1 min 16 s of training", "CPU (2 cores)",
                 "torch 2.13.0", "learning_rate=0.001"):
        assert text in html, text


def test_curves_hold_the_whole_resumed_history(tmp_path):
    run = make_run(tmp_path, SCORES)
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    steps, losses = series(history, "loss")
    assert steps == list(range(10, 101, 10)) and losses[4] == pytest.approx(4.0 / 50)  # the resumed value wins
    html = write_report(run).read_text()
    for gid, points in (("curve-loss", 10), ("curve-learning_rate", 10), ("curve-eval_loss", 2),
                        ("curve-eval_vqa_accuracy", 2)):
        match = re.search(rf'<g id="{gid}">\s*<path d="([^"]+)"', html)
        assert match, gid
        assert len(re.findall(r"[ML]", match[1])) == points, gid  # one vertex per logged step
    assert "curve-eval_runtime" not in html and "curve-grad_norm" not in html


def test_metrics_before_and_after_side_by_side(tmp_path):
    html = write_report(make_run(tmp_path, SCORES)).read_text()
    table = html[html.index('<table class="metrics">'):html.index("</table>", html.index('<table class="metrics">'))]
    assert "before training" in table and "after training" in table and "change" in table
    headline = re.search(r'<tr class="headline"><td>vqa_accuracy</td>\s*(.*?)</tr>', table, re.DOTALL)[1]
    assert re.findall(r">([^<]*)</td>", headline) == ["0.25", "0.75", "+0.5"]


def test_gallery_worst_first_with_per_example_scores_and_before(tmp_path):
    html = write_report(make_run(tmp_path, SCORES)).read_text()
    assert cards(html) == ["wrong"] * 3 + ["right"] * 7
    first = html[html.index('<article class="card'):]
    assert "answer 1" in first[:first.index("</article>")]  # score 0.0, file order among equals
    assert "Wrong (3)" in html and "Right (7)" in html and "All (10)" in html
    assert "ref 1 | other" in html and "old 1" in html  # references, and the base model's answer
    assert "&lt;image&gt;" not in html  # placeholders are shown as thumbnails, not text


def test_gallery_is_bounded_and_keeps_every_wrong_answer(tmp_path):
    scores = [1.0] * 300 + [0.0] * 20 + [0.6] * 100 + [0.2] * 10
    rows = [{"id": str(i), "score": s} for i, s in enumerate(scores)]
    chosen = select_examples(rows, 50, 0.5)
    assert len(chosen) == 50
    assert [r["score"] for r in chosen[:30]] == [0.0] * 20 + [0.2] * 10  # all 30 wrong, worst first
    assert {r["score"] for r in chosen[30:]} == {1.0, 0.6}  # the rest spread over the file
    assert len(select_examples(rows, 25, 0.5)) == 25 and all(r["score"] == 0.0 for r in select_examples(rows, 20, 0.5))
    html = write_report(make_run(tmp_path, [1.0] * 30 + [0.0] * 5), report_examples=12).read_text()
    assert cards(html) == ["wrong"] * 5 + ["right"] * 7 and "12 of 35 examples" in html
    assert len(cards(write_report(tmp_path / "run", report_examples=0).read_text())) == 0


def test_thumbnails_are_small_and_missing_images_get_a_placeholder(tmp_path):
    run = make_run(tmp_path, SCORES)
    (tmp_path / "images" / "3.png").unlink()
    html = write_report(run).read_text()
    uri = re.search(r"url\(data:image/jpeg;base64,([^)]+)\)", html)[1]
    with Image.open(io.BytesIO(base64.b64decode(uri))) as thumb:
        assert max(thumb.size) == 96 and thumb.format == "JPEG"
    assert html.count("image not found</div>") == 1


def test_old_predictions_without_scores_or_images_still_render(tmp_path):
    run = make_run(tmp_path, [None] * 4, before=False, images=False)
    (run / "run_info.json").unlink()
    html = write_report(run).read_text()
    assert cards(html) == ["unscored"] * 4 and 'data-filter="wrong"' not in html
    assert "4 without a per-example score" in html and "before training" not in html


def test_dialogue_turns_and_retrieval_top5(tmp_path):
    run = make_run(tmp_path, [0.2, 1.0])
    turns = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Two circles."},
             {"role": "user", "content": "Which colour?"}]
    rows = [{"id": "d", "prompt": "Which colour?", "prediction": "red", "references": ["blue"], "score": 0.2,
             "messages": turns},
            {"id": "r", "images": [], "references": ["a red circle"], "score": 1.0,
             "top5": [{"text": "a red circle", "score": 0.91, "match": True},
                      {"text": "a blue square", "score": 0.55, "match": False}]}]
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = write_report(run).read_text()
    assert '<span class="role">assistant:</span> Two circles.' in html
    assert re.search(r'<li class="match">a red circle .*true match', html)
    assert cards(html) == ["wrong", "right"]


def test_a_run_evaluated_only_during_training_shows_the_newest_eval_step(tmp_path):
    run = make_run(tmp_path, SCORES, before=False)
    (run / "eval").rename(run / "eval-step-50")
    shutil.copytree(run / "eval-step-50", run / "eval-step-100")  # 100 > 50 as numbers, not as text
    html = write_report(run).read_text()
    assert "from eval-step-100/predictions.jsonl" in html and ">at step 100</th>" in html


def test_a_folder_without_eval_or_state_says_what_to_run(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    html = write_report(run).read_text()
    assert "No training log" in html and html.count("finetune eval RUN") == 2


def test_the_report_stays_on_the_machine(tmp_path):
    from finetune.hub import shared_files

    run = make_run(tmp_path, SCORES)
    write_report(run)
    assert "report.html" not in shared_files(run)  # it holds thumbnails of private held-out images


def test_report_command_rebuilds_it(tmp_path, capsys):
    run = make_run(tmp_path, SCORES)
    assert main(["report", str(run), "--examples", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert len(cards((run / "report.html").read_text())) == 4
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- browser

@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    run = make_run(tmp_path, SCORES)
    (tmp_path / "images" / "3.png").unlink()  # a placeholder on the page too
    path = write_report(run)
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                    else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")

            assert problems == []
            assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # no network
            for chart in ("loss", "learning-rate", "eval-metrics"):
                box = page.locator(f"#chart-{chart} svg").bounding_box()
                assert box and box["width"] > 200 and box["height"] > 100, chart
            curve = page.locator("#curve-loss > path").bounding_box()
            assert curve and curve["width"] > 100 and curve["height"] > 20  # the line itself is drawn
            thumb = page.locator("#gallery .thumb:not(.missing)").first
            assert thumb.evaluate("e => getComputedStyle(e).backgroundImage").startswith('url("data:image/jpeg')
            assert page.locator("#gallery .thumb.missing").count() == 1

            visible = page.locator("#gallery .card:visible")
            assert visible.count() == 10
            for name, count in (("wrong", 3), ("right", 7), ("all", 10)):
                page.click(f'#filters button[data-filter="{name}"]')
                assert visible.count() == count, name
                assert page.inner_text("#shown") == str(count)
                if name != "all":
                    assert page.locator(f"#gallery .card.{name}:visible").count() == count
            assert problems == []
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_training_and_eval_write_the_report(tmp_path):
    from finetune import train
    from finetune.evaluation import evaluate

    run = train("demo/vqa", {"output_dir": str(tmp_path / "run"), "data.train": "synthetic:vqa/train?n=16",
                             "data.eval": "synthetic:vqa/eval?n=4", "train.max_steps": 4,
                             "train.logging_steps": 1, "eval.report_examples": 10})
    html = (run / "report.html").read_text()
    assert len(cards(html)) == 10 and "10 of 16 examples" in html  # 4 images x 4 questions, bounded
    assert "curve-loss" in html and "before training" in html
    info = json.loads((run / "run_info.json").read_text())
    assert info["trainable_parameters"] > 0 and info["seconds"] > 0 and info["hardware"]
    row = json.loads((run / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert {"images", "score", "messages"} <= set(row) and Path(row["images"][0]).is_file()
    shown_images = set(re.findall(r'class="thumb (t\d+)"', html))
    assert html.count("data:image/jpeg;base64,") == len(shown_images) <= 4  # each distinct image inlined once

    (run / "report.html").unlink()
    evaluate(run, {"eval.report_examples": 5})  # finetune eval refreshes it
    assert len(cards((run / "report.html").read_text())) == 5


def test_before_is_left_out_when_a_later_eval_used_other_data(tmp_path):
    """`finetune eval RUN data.eval=other` after training: the base's numbers were on other data, not comparable."""
    run = tmp_path / "run"
    for folder, dataset, score in (("eval-before", "a.jsonl", 0.1), ("eval", "b.jsonl", 0.9)):
        (run / folder).mkdir(parents=True)
        (run / folder / "metrics.json").write_text(json.dumps({"vqa_accuracy": score, "dataset": dataset}))
        (run / folder / "predictions.jsonl").write_text(json.dumps(
            {"id": "x", "prompt": "q", "prediction": dataset, "references": ["r"], "score": score}) + "\n")
    (run / "recipe.yaml").write_text("task: vqa\n")
    html = write_report(run).read_text()
    assert "0.9" in html and "0.1" not in html and "a.jsonl" not in html
