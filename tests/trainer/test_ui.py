"""`trainer ui` driven in headless Chromium: upload 15 images, edit a caption, pre-flight,
train a few steps of `trainer lora` on the tiny base model, watch the loss curve and a
preview appear, download the adapter and load it with `load_lora_weights`; close the page
mid-training and reconnect to the running job; stop and resume."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.browser import console_errors, screenshot
from tests.trainer.lora_helpers import TRIGGER, write_concept_folder
from trainer.ui import Workspace, build_app, launch

# `trainer lora` settings for short CPU runs (as tests/trainer/test_lora.py's short_config).
OVERRIDES = [
    "log_every_steps=1", "optim.batch_size=4", "optim.warmup_steps=2", "prior.images=4", "prior.sample_steps=2",
    "holdout.images=2", "holdout.every_steps=2", "preview.every_steps=2", "preview.steps=2",
    "preview.images_per_prompt=1", "checkpoint.every_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_model(lora_base_run) -> Path:
    # The LoRA tests' base (tests/trainer/conftest.py), built once per session: the UI
    # tests check plumbing, not learning, so any base serves.
    return lora_base_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, base_model, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the training process
    workspace = Workspace(tmp_path / "work", str(base_model))
    app = build_app(workspace, device="cpu")
    port = _free_port()
    launch(app, workspace, "127.0.0.1", port, block=False)
    yield workspace, f"http://127.0.0.1:{port}/"
    workspace.stop()
    app.close()


@pytest.fixture
def browser(browser):
    # The session's Chromium (tests/browser.py), with a window tall enough for the whole form.
    browser.set_window_size(1280, 1600)
    return browser


def wait_for(driver, predicate, timeout: float = 120, what: str = "condition"):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Gradio re-renders components as they update: an element found may be replaced before it is read.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: predicate(d), message=f"timed out waiting for {what}")


def css(driver, selector: str):
    return driver.find_elements("css selector", selector)


def set_text(driver, elem_id: str, text: str) -> None:
    field = css(driver, f"#{elem_id} textarea, #{elem_id} input")[0]
    field.clear()
    field.send_keys(text)


def open_tab(driver, label: str) -> None:
    tabs = wait_for(driver, lambda d: [b for b in css(d, "button[role=tab]") if b.text.strip() == label], 60, f"the tab {label!r}")
    tabs[0].click()


def status(driver) -> str:
    return css(driver, "#status textarea")[0].get_attribute("value")


def curve_drawn(driver) -> bool:
    """The loss plot's SVG holds a visible line with at least one segment."""
    paths = css(driver, "#loss-plot .mark-line path")
    return any(
        "L" in (p.get_attribute("d") or "") and (p.get_attribute("stroke") or "none") not in ("none", "transparent")
        and p.get_attribute("stroke-opacity") not in ("0",)
        for p in paths
    )


def set_up_and_start(driver, url: str, images_dir: Path, steps: int) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    wait_for(driver, lambda d: css(d, "#upload input[type=file]"), 60, "the page")
    files = sorted(str(p) for p in images_dir.iterdir())
    css(driver, "#upload input[type=file]")[0].send_keys("\n".join(files))
    wait_for(driver, lambda d: "concept14.png" in css(d, "#captions")[0].text, 60, "the caption table")

    # Edit one caption: pick the image, change its text, save.
    picker = css(driver, "#caption-image input")[0]
    picker.click()
    picker.send_keys("concept03.png")
    picker.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: "zxq" in css(d, "#caption-text textarea, #caption-text input")[0].get_attribute("value"), 30, "the caption")
    set_text(driver, "caption-text", f"a small green blob on a {TRIGGER} background")
    css(driver, "#save-caption")[0].click()
    wait_for(driver, lambda d: "a small green blob" in css(d, "#captions")[0].text, 30, "the saved caption")

    open_tab(driver, "2. Settings and pre-flight")
    set_text(driver, "trigger", TRIGGER)
    set_text(driver, "rank", "4")
    set_text(driver, "steps", str(steps))
    set_text(driver, "lr", "0.003")
    set_text(driver, "overrides", "\n".join(OVERRIDES))
    css(driver, "#preflight")[0].click()
    wait_for(driver, lambda d: "used: 15" in (css(d, "#preflight-report textarea")[0].get_attribute("value") or ""), 120, "the pre-flight report")
    report = css(driver, "#preflight-report textarea")[0].get_attribute("value")
    assert "set aside: none" in report and "'a small green blob" in report

    open_tab(driver, "3. Train")
    css(driver, "#start")[0].click()
    wait_for(driver, lambda d: status(d).startswith("training"), 60, "training to start")


def test_train_a_lora_from_the_browser(tmp_path, served, browser):
    workspace, url = served
    images = write_concept_folder(tmp_path / "generated", count=15)
    set_up_and_start(browser, url, images, steps=6)
    assert (workspace.root / "images" / "concept03.txt").read_text().strip() == f"a small green blob on a {TRIGGER} background"
    assert len(list((workspace.root / "images").glob("*.png"))) == 15

    # The loss curve and a preview appear while it trains (or by the time it finishes).
    wait_for(browser, lambda d: css(d, "#loss-plot canvas, #loss-plot svg"), 300, "the loss plot")
    wait_for(browser, curve_drawn, 300, "the loss curve to be drawn")
    wait_for(browser, lambda d: css(d, "#previews img"), 300, "a preview image")
    wait_for(browser, lambda d: status(d).startswith("finished"), 600, "training to finish")
    assert workspace.losses() and [r for r in workspace.losses() if r["series"] == "train"][-1]["step"] == 6
    wait_for(browser, curve_drawn, 60, "the final loss curve")
    time.sleep(2)  # let the last redraw settle before the screenshot
    screenshot(browser, "lora_ui", tmp_path)

    # Download the diffusers adapter through the page and load it.
    link = wait_for(
        browser,
        lambda d: [a for a in css(d, "#adapters a") if "pytorch_lora_weights.safetensors" in (a.get_attribute("href") or "") + a.text],
        60, "the adapter link",
    )[0]  # fmt: skip
    link.click()
    target = browser.downloads / "pytorch_lora_weights.safetensors"
    wait_for(browser, lambda d: target.is_file() and target.stat().st_size > 0, 60, "the download")
    assert target.read_bytes() == (workspace.run_dir() / "pytorch_lora_weights.safetensors").read_bytes()
    assert any("lora_comfyui.safetensors" in (a.get_attribute("href") or "") + a.text for a in css(browser, "#adapters a"))

    from trainer.export import export_dir, load_exported_pipeline

    pipe = load_exported_pipeline(export_dir(workspace.base))
    pipe.load_lora_weights(str(browser.downloads), weight_name="pytorch_lora_weights.safetensors", adapter_name="ui")
    assert "ui" in pipe.transformer.peft_config
    assert console_errors(browser) == []


def test_closing_the_page_leaves_training_running_and_a_new_page_reconnects(tmp_path, served, browser):
    workspace, url = served
    images = write_concept_folder(tmp_path / "generated", count=15)
    set_up_and_start(browser, url, images, steps=400)
    pid = workspace.job()["pid"]
    wait_for(browser, lambda d: workspace.losses(), 300, "the first loss")

    browser.get("about:blank")  # the tab is gone; the job is not
    time.sleep(3)
    os.kill(pid, 0)
    assert workspace.running()
    steps_before = max(r["step"] for r in workspace.losses())

    browser.get(url)
    open_tab(browser, "3. Train")
    wait_for(browser, lambda d: status(d).startswith(f"training (pid {pid})"), 60, "the running job")
    wait_for(browser, curve_drawn, 60, "the loss curve")
    wait_for(browser, lambda d: max(r["step"] for r in workspace.losses()) > steps_before, 300, "training to go on")

    css(browser, "#stop")[0].click()
    wait_for(browser, lambda d: status(d).startswith("stopped"), 60, "the stop")
    assert not workspace.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    css(browser, "#resume")[0].click()
    wait_for(browser, lambda d: status(d).startswith("training"), 60, "the resume")
    assert workspace.job()["pid"] != pid and "--resume" in workspace.job()["command"]
    assert console_errors(browser) == []


def test_binding_elsewhere_warns(tmp_path, capsys, monkeypatch):
    import argparse

    from trainer import ui

    parser = argparse.ArgumentParser()
    ui.add_ui_arguments(parser)
    monkeypatch.setattr(ui, "launch", lambda *a, **k: None)
    monkeypatch.setattr(ui, "build_app", lambda *a, **k: None)
    args = parser.parse_args(["--base", str(tmp_path), "--workdir", str(tmp_path / "w"), "--host", "0.0.0.0"])
    assert ui.cmd_ui(args) == 0
    assert "no authentication" in capsys.readouterr().err
    args = parser.parse_args(["--base", str(tmp_path), "--workdir", str(tmp_path / "w")])
    assert args.host == "127.0.0.1"
    assert ui.cmd_ui(args) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_page_settings_become_trainer_lora_flags(tmp_path):
    """What Start runs is `trainer lora` with the page's settings, parsed by its own parser."""
    import argparse

    from trainer.lora import add_lora_arguments, config_from_args

    workspace = Workspace(tmp_path / "work", str(tmp_path / "base"))
    args = workspace._lora_args(None, tmp_path / "run", "zxq", 4.0, 6.0, 0.003, ["holdout.patience=5", ""], True, "models/llava")
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    config = config_from_args(parser.parse_args(args))
    assert (config.trigger, config.adapter.rank, config.optim.steps, config.optim.lr) == ("zxq", 4, 6, 0.003)
    assert config.output.comfyui and config.holdout.patience == 5 and config.data.recaption.model == "models/llava"
    assert args[args.index("--images") + 1] == str(tmp_path / "work" / "images")
