"""``bindweave demo``: try a model in the browser (a Gradio app).

    bindweave demo                                   # the shipped sprites model (models/sprites)
    bindweave demo --pretrained path/to/export       # any `bindweave weights export` folder
    bindweave demo --checkpoint outputs/tiny/checkpoints/last.ckpt

A prompt, 1–4 reference images, seed, steps and guidance in; the video and its contact sheet
(references, then frames) out, with a progress bar over the denoising steps. A bad input (no
reference, an unreadable image, an empty prompt) is shown as a message on the page, never a
traceback. Needs the ``demo`` extra: ``pip install -e '.[demo]'`` (Gradio).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from bindweave.errors import UserError, report

if TYPE_CHECKING:  # imported where a pipeline is loaded: `--help` and a wrong path answer without the model stack
    from bindweave.inference.pipeline import BindWeavePipeline

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "sprites"
"""The model ``bindweave demo`` serves when given none (an export folder of a repository checkout)."""
EXAMPLES = ROOT / "examples" / "sprites"
MAX_REFERENCES = 4
ERROR_TITLE = "Cannot generate"

log = logging.getLogger(__name__)


def import_gradio():
    """Gradio, or a :class:`UserError` saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise UserError("the demo needs Gradio, which is not installed; run `pip install -e '.[demo]'` "
                        "(or `pip install gradio`).") from None
    return gradio


def check_inputs(prompt: str, references: list[str] | None, max_references: int = MAX_REFERENCES) -> list[str]:
    """The reference paths of a demo request; ValueError with the fix for what the page can get wrong."""
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty: describe the video, e.g. 'On a grey background, the first "
                         "subject moves to the right.'")
    references = [str(r) for r in references or []]
    if not references:
        raise ValueError("No reference image: upload 1 to 4 images of the subjects.")
    if len(references) > max_references:
        raise ValueError(f"{len(references)} reference images, but the model takes at most {max_references}: "
                         f"remove {len(references) - max_references}.")
    return references


def generate(pipe: BindWeavePipeline, prompt: str, references: list[str] | None, seed: int, steps: int,
             guidance: float, negative_prompt: str = "", output_dir: str | Path | None = None,
             on_step=None) -> tuple[str, str]:
    """One video for the page: ``(mp4 path, contact sheet png path)``. ValueError for bad input.

    ``on_step(done, total)`` hears every denoising step (the page's progress bar)."""
    references = check_inputs(prompt, references)
    steps = int(steps)
    callback = None
    if on_step is not None:
        def callback(_pipe, i, _t, _tensors):
            on_step(i + 1, steps)
            return {}
    video = pipe(prompt, references, seed=int(seed), num_inference_steps=steps, guidance_scale=float(guidance),
                 negative_prompt=negative_prompt.strip() or None, callback_on_step_end=callback, progress=False)
    folder = Path(output_dir or tempfile.mkdtemp(prefix="bindweave-demo-"))
    name = f"seed{int(seed)}-{uuid.uuid4().hex[:8]}"
    return str(video.save(folder / f"{name}.mp4")), str(video.save_contact_sheet(folder / f"{name}.png"))


def build_demo(pipe: BindWeavePipeline, title: str = "BindWeave", examples: list[list] | None = None,
               output_dir: str | Path | None = None):
    """The Gradio app (``gr.Blocks``) over ``pipe``; ``.launch()`` serves it."""
    gr = import_gradio()
    sampling = pipe.sampling
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="bindweave-demo-"))

    def run(prompt, files, seed, steps, guidance, negative_prompt, progress=gr.Progress()):
        paths = [getattr(f, "name", f) for f in files or []]
        progress(0, desc="Encoding")
        try:
            return generate(pipe, prompt, paths, seed, steps, guidance, negative_prompt or "", output_dir,
                            on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
        except ValueError as error:  # bad input: the message, on the page
            raise gr.Error(str(error), title=ERROR_TITLE) from None
        except Exception as error:  # a bug or an environment failure: the console keeps the traceback
            log.exception("bindweave demo: generation failed")
            raise gr.Error(f"Generation failed ({type(error).__name__}: {error}); the console has the details.",
                           title=ERROR_TITLE) from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nA prompt and 1–{MAX_REFERENCES} reference images of the subjects in; a "
                    f"{sampling.num_frames}-frame {sampling.width}×{sampling.height} video out.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="On a grey background, the first subject moves to the right.")
                references = gr.File(label=f"Reference images (1–{MAX_REFERENCES})", file_count="multiple",
                                     file_types=["image"], type="filepath", elem_id="references")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, max(100, sampling.num_steps), value=sampling.num_steps, step=1,
                                      label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 15.0, value=sampling.guidance_scale, step=0.5,
                                         label="Guidance scale", elem_id="guidance")
                negative = gr.Textbox(label="Negative prompt (optional)", lines=1, elem_id="negative")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True)
                sheet = gr.Image(label="Contact sheet: references, then frames", type="filepath", elem_id="sheet")
        if examples:
            gr.Examples(examples, inputs=[prompt, references, seed])
        button.click(run, [prompt, references, seed, steps, guidance, negative], [video, sheet],
                     concurrency_limit=1)  # one model: one generation at a time
    return demo


def shipped_examples() -> list[list]:
    """Two requests of ``examples/sprites/requests.jsonl`` (prompt, references, seed), when present."""
    import json

    path = EXAMPLES / "requests.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[:2]:
        request = json.loads(line)
        rows.append([request["prompt"], [str(EXAMPLES / r) for r in request.get("references", [])],
                     request.get("seed", 0)])
    return rows


def model_source(checkpoint: str | None, pretrained: str | None) -> tuple[str, Path]:
    """``("checkpoint", file)`` or ``("pretrained", folder)`` (default: the shipped sprites model),
    checked to exist: a wrong path is one line before anything heavy is imported."""
    if checkpoint and pretrained:
        raise UserError("pass --checkpoint or --pretrained, not both.")
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint!r} does not exist; pass the .ckpt written by `bindweave fit`.")
        return "checkpoint", Path(checkpoint)
    folder = Path(pretrained) if pretrained else SHIPPED
    if not (folder / "config.yaml").is_file():
        what = "the shipped sprites model" if not pretrained else "export folder"
        raise UserError(f"{what} {str(folder)!r} has no config.yaml; pass an export folder of "
                        f"`bindweave weights export` with --pretrained, or a .ckpt with --checkpoint.")
    return "pretrained", folder


def load_pipeline(checkpoint: str | None, pretrained: str | None, device: str = "cpu") -> BindWeavePipeline:
    """The pipeline of ``--checkpoint`` or ``--pretrained`` (default: the shipped sprites model)."""
    return open_pipeline(model_source(checkpoint, pretrained), device)


def open_pipeline(source: tuple[str, Path], device: str = "cpu") -> BindWeavePipeline:
    """The pipeline of a checked :func:`model_source`."""
    kind, path = source
    from bindweave.inference.pipeline import BindWeavePipeline

    if kind == "checkpoint":
        return BindWeavePipeline.from_checkpoint(str(path), device=device)
    return BindWeavePipeline.from_pretrained(path, device=device)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bindweave demo", description="Try a model in the browser (Gradio).")
    p.add_argument("--checkpoint", help="a Lightning .ckpt of `bindweave fit`")
    p.add_argument("--pretrained", help=f"an export folder of `bindweave weights export` (default: {SHIPPED})")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    return p


def main(argv: list[str] | None = None) -> None:
    """``bindweave demo [--checkpoint X | --pretrained DIR]``: serve the app until interrupted."""
    args = parser().parse_args(argv)
    try:
        source = model_source(args.checkpoint, args.pretrained)  # a wrong path first: Gradio takes ~10 s to import
        import_gradio()
        pipe = open_pipeline(source, args.device)
        shipped = not args.checkpoint and not args.pretrained
        demo = build_demo(pipe, title="BindWeave: the shipped sprites model" if shipped else "BindWeave",
                          examples=shipped_examples() if shipped else None)
    except ValueError as error:  # UserError, or a checkpoint/export that does not load (named, with the fix)
        raise report("demo", error) from None
    print(f"bindweave demo: serving on http://{args.host}:{args.port} (Ctrl+C stops it)")
    demo.queue().launch(server_name=args.host, server_port=args.port, show_error=False)
