"""``bindweave demo`` (issue #24): its checks and loading, and the page in a real headless Chromium:
upload a reference, generate, a video appears; a bad input shows its message, not a traceback.

The browser test needs Gradio and Playwright (the ``test`` extra) and a Chromium: Debian's
``chromium`` package (``apt-get install chromium``; ``.ci/run`` installs it), or Playwright's own
(``playwright install chromium``), or the path in ``BINDWEAVE_CHROMIUM``. Without one it skips and
says why."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from bindweave.cli.command import run_command
from bindweave.cli.demo import SHIPPED, check_inputs, generate, load_pipeline
from bindweave.errors import UserError
from bindweave.inference.pipeline import BindWeavePipeline
from tests.pipeline_helpers import cli_module, draw_reference, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return BindWeavePipeline.from_module(cli_module(tiny_model_config(num_steps=2)))


@pytest.fixture(scope="module")
def red(tmp_path_factory):
    return draw_reference(tmp_path_factory.mktemp("demo") / "red.png", (220, 40, 40))


def test_bad_inputs_are_messages(red):
    with pytest.raises(ValueError, match="prompt is empty"):
        check_inputs(" ", [str(red)])
    with pytest.raises(ValueError, match="No reference image: upload 1 to 4"):
        check_inputs("a red circle", None)
    with pytest.raises(ValueError, match="5 reference images.*at most 4: remove 1"):
        check_inputs("a red circle", [str(red)] * 5)


def test_generate_writes_the_video_and_contact_sheet_and_reports_steps(pipe, red, tmp_path):
    steps = []
    video, sheet = generate(pipe, "the red circle moves left", [str(red)], seed=1, steps=3, guidance=2.0,
                            output_dir=tmp_path, on_step=lambda done, total: steps.append((done, total)))
    assert Path(video).suffix == ".mp4" and Path(video).stat().st_size > 0 and Path(sheet).suffix == ".png"
    assert steps == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="Reference 0: reference image .* does not exist"):
        generate(pipe, "x", [str(tmp_path / "gone.png")], 0, 1, 1.0, output_dir=tmp_path)


def test_loading_defaults_to_the_shipped_model_and_names_bad_paths(tmp_path, capsys):
    assert SHIPPED == ROOT / "models" / "sprites" and (SHIPPED / "config.yaml").is_file()
    with pytest.raises(UserError, match="not both"):
        load_pipeline("a.ckpt", "folder")
    with pytest.raises(UserError, match="export folder .* has no config.yaml"):
        load_pipeline(None, str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:  # with or without Gradio: the path is checked first
        run_command(["demo", "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bindweave demo: error: checkpoint") and "does not exist" in err[0]


def chromium() -> str | None:
    """A Chromium executable: BINDWEAVE_CHROMIUM, Debian's, or None (Playwright's own, if installed)."""
    for candidate in (os.environ.get("BINDWEAVE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_headless_browser(pipe, red, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed: pip install -e '.[test]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    from bindweave.cli.demo import build_demo

    demo = build_demo(pipe, output_dir=tmp_path)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            try:
                browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            except sync_api.Error as error:
                pytest.skip(f"no Chromium to drive (apt-get install chromium, or set BINDWEAVE_CHROMIUM): "
                            f"{str(error).splitlines()[0]}")
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.set_default_timeout(120_000)  # a cold 2-core CI machine: Gradio's first page load and run are slow
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.wait_for_selector("#prompt textarea")
            page.fill("#prompt textarea", "the red circle moves left")
            page.set_input_files("#references input[type=file]", [str(red)])
            page.wait_for_selector("#references >> text=red.png")
            page.click("#generate")
            page.wait_for_selector("#video video[src]")
            assert page.get_attribute("#video video", "src").endswith(".mp4")
            page.wait_for_selector("#sheet img[src]")
            # A bad input: its message on the page, no traceback.
            page.fill("#prompt textarea", "")
            page.click("#generate")
            message = page.wait_for_selector("text=The prompt is empty")
            assert "Traceback" not in page.content() and message.is_visible()
            browser.close()
    finally:
        demo.close()


def test_a_wrong_model_path_is_named_before_gradio_is_needed(tmp_path, capsys, monkeypatch):
    """The path is checked before Gradio is imported (~10 s, or not installed at all)."""
    import bindweave.cli.demo as demo

    def no_gradio():
        raise UserError("gradio is not installed (test)")

    monkeypatch.setattr(demo, "import_gradio", no_gradio)
    with pytest.raises(SystemExit):
        run_command(["demo", "--pretrained", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "has no config.yaml" in err and "gradio" not in err
