"""`trainer ui`: train a LoRA from the browser, with the same code as `trainer lora`.

    trainer ui --base MODEL [--workdir DIR] [--host 127.0.0.1] [--port 7860]

A Gradio app (Gradio is what the ecosystem's web trainers and model demos use: one
Python file, no front-end build, file upload/download, galleries and plots built in).
It binds to 127.0.0.1 unless `--host` says otherwise; anything else prints a warning,
because the app has no authentication and can start processes and read files.

What it does, all under the work folder DIR (default `./lora-ui`):

- images: upload files into `DIR/images/`, or point it at an existing folder; captions
  are the `IMAGE.txt` files `trainer lora` reads, listed in a table and edited one at a
  time (pick the image, change the text, save); images without one can be captioned by
  the recaption model (`--recaption-model`) when one is named;
- pre-flight: `trainer.lora_data.prepare_dataset` on the folder, shown with
  `trainer.lora_report.format_data_report`: exactly what `trainer lora` prints before
  training (counts, buckets, what is set aside and why);
- training: "Start" launches `python -m trainer lora --images ... --base ... --output
  DIR/runs/run-NNN` with the trigger word, rank, steps and learning rate set in the page
  (plus any `--set` overrides) as a child process in its own session: it is not tied to
  the browser tab, and outlives this server too. `DIR/job.json` records it, so any page
  opened later (a reconnect, another tab) shows the running job. "Stop" sends SIGTERM to
  its process group; "Resume" runs the same command with `--resume` (the last
  checkpoint);
- monitoring: every second the page reads the run's `metrics.jsonl` (loss curve), its
  `samples/*.png` (preview grids, newest first) and the tail of its log;
- download: the adapter files once written (`pytorch_lora_weights.safetensors`, and
  `lora_comfyui.safetensors` with "ComfyUI file" on).

There is no second training path: the UI only writes files `trainer lora` reads and
runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("trainer.ui")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
JOB_FILE = "job.json"
LOG_FILE = "train.log"


# ---------------------------------------------------------------- the work folder


@dataclass
class Workspace:
    """DIR/images (the training folder by default), DIR/runs/run-NNN, DIR/job.json."""

    root: Path
    base: str

    def __post_init__(self):
        self.root = Path(self.root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "runs").mkdir(exist_ok=True)

    # -- images and captions

    def images_dir(self, folder: str | None = None) -> Path:
        return Path(folder).expanduser() if folder else self.root / "images"

    def images(self, folder: str | None = None) -> list[Path]:
        directory = self.images_dir(folder)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such folder")
        return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def add_images(self, paths: list[str]) -> list[str]:
        """Copy uploaded files (and their .txt captions, if uploaded) into DIR/images."""
        added = []
        for source in map(Path, paths):
            if source.suffix.lower() not in IMAGE_SUFFIXES | {".txt"}:
                raise ValueError(f"{source.name}: not an image (.png, .jpg, .webp, .bmp) or a .txt caption")
            target = self.root / "images" / source.name
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)  # never a partial file under the final name
            added.append(target.name)
        return added

    def caption_rows(self, folder: str | None = None) -> list[list[str]]:
        rows = []
        for image in self.images(folder):
            caption = image.with_suffix(".txt")
            rows.append([image.name, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""])
        return rows

    def save_caption(self, name: str, text: str, folder: str | None = None) -> Path:
        image = self.images_dir(folder) / name
        if not image.is_file():
            raise FileNotFoundError(f"{image}: no such image")
        caption = image.with_suffix(".txt")
        tmp = caption.with_name(f".{caption.name}.part")
        tmp.write_text(text.strip() + "\n", encoding="utf-8")
        os.replace(tmp, caption)
        return caption

    # -- pre-flight

    def preflight(self, folder: str | None, trigger: str | None, overrides: list[str], recaption_model: str | None = None) -> str:
        """What `trainer lora` prints about the folder before training (its own functions)."""
        from trainer.export import export_dir, load_exported_pipeline
        from trainer.lora import add_lora_arguments, config_from_args
        from trainer.lora_data import load_recaptioner, prepare_dataset
        from trainer.lora_report import format_data_report

        args = self._lora_args(folder, self.root / "runs" / "preflight", trigger, None, None, None, overrides, recaption_model=recaption_model)
        parser = argparse.ArgumentParser()
        add_lora_arguments(parser)
        config = config_from_args(parser.parse_args(args))
        pipe = load_exported_pipeline(export_dir(self.base))
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        recaptioner = load_recaptioner(config.data.recaption) if config.data.recaption else None
        report = prepare_dataset(
            self.images_dir(folder), config,
            resolution=config.data.resolution or pipe.transformer.config.sample_size * factor,
            multiple=factor * pipe.transformer.config.patch_size, recaptioner=recaptioner,
        )  # fmt: skip
        return format_data_report(report)

    # -- the training job

    def _lora_args(self, folder, output, trigger, rank, steps, lr, overrides, comfyui=False, recaption_model=None) -> list[str]:
        args = ["--images", str(self.images_dir(folder)), "--base", str(self.base), "--output", str(output)]
        for flag, value in (("--trigger", trigger), ("--rank", rank), ("--steps", steps), ("--lr", lr)):
            if value not in (None, ""):
                args += [flag, str(int(value) if flag in ("--rank", "--steps") else value)]
        if comfyui:
            args.append("--comfyui")
        if recaption_model:
            args += ["--recaption-model", recaption_model]
        for line in overrides:
            if line.strip():
                args += ["--set", line.strip()]
        return args

    def job(self) -> dict | None:
        path = self.root / JOB_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_job(self, job: dict) -> None:
        tmp = self.root / f".{JOB_FILE}.part"
        tmp.write_text(json.dumps(job, indent=2))
        os.replace(tmp, self.root / JOB_FILE)

    def running(self) -> bool:
        job = self.job()
        if not job or job.get("returncode") is not None:
            return False
        try:
            os.kill(job["pid"], 0)
        except ProcessLookupError:
            return False
        # A zombie child of this server counts as finished: reap it.
        try:
            pid, status = os.waitpid(job["pid"], os.WNOHANG)
        except ChildProcessError:
            return _alive(job["pid"])
        if pid:
            job["returncode"] = os.waitstatus_to_exitcode(status)
            self._write_job(job)
            return False
        return True

    def start(
        self, folder, trigger, rank, steps, lr, overrides: list[str], comfyui: bool = False, resume: bool = False,
        device: str | None = None, recaption_model: str | None = None,
    ) -> dict:  # fmt: skip
        if self.running():
            raise RuntimeError("a training job is already running; stop it first")
        previous = self.job()
        if resume:
            if not previous:
                raise RuntimeError("nothing to resume: no run has been started in this work folder")
            run_dir = Path(previous["run_dir"])
            command = [*previous["command"]]
            if "--resume" not in command:
                command.append("--resume")
        else:
            runs = sorted(self.root.glob("runs/run-*"))
            run_dir = self.root / "runs" / f"run-{len(runs) + 1:03d}"
            command = [sys.executable, "-m", "trainer", "lora", *self._lora_args(folder, run_dir, trigger, rank, steps, lr, overrides, comfyui, recaption_model)]
            if device:
                command += ["--device", device]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.root / LOG_FILE
        with log_path.open("ab") as log:
            log.write(f"\n$ {shlex.join(command)}\n".encode())
            log.flush()
            # Its own session: closing the tab, or stopping this server, does not stop training.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        job = {"pid": process.pid, "command": command, "run_dir": str(run_dir), "started": time.time(), "returncode": None}
        self._write_job(job)
        return job

    def stop(self) -> bool:
        job = self.job()
        if not job or not self.running():
            return False
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except ProcessLookupError:
            return False
        for _ in range(100):
            if not self.running():
                break
            time.sleep(0.1)
        job = self.job() or job
        job["returncode"] = job.get("returncode") if job.get("returncode") is not None else -signal.SIGTERM
        job["stopped"] = True
        self._write_job(job)
        return True

    # -- what the run has produced

    def run_dir(self) -> Path | None:
        job = self.job()
        return Path(job["run_dir"]) if job else None

    def losses(self) -> list[dict]:
        run = self.run_dir()
        path = run / "metrics.jsonl" if run else None
        if not path or not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record.get("kind") == "train" and record.get("loss") is not None:
                rows.append({"step": record["step"], "loss": record["loss"], "series": "train"})
            elif record.get("kind") == "eval" and record.get("heldout_loss") is not None:
                rows.append({"step": record["step"], "loss": record["heldout_loss"], "series": "held-out"})
        return rows

    def previews(self) -> list[str]:
        run = self.run_dir()
        if not run or not (run / "samples").is_dir():
            return []
        return [str(p) for p in sorted((run / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)]

    def adapters(self) -> list[str]:
        from trainer.lora import COMFYUI_FILE, LORA_FILE

        run = self.run_dir()
        if not run:
            return []
        return [str(run / name) for name in (LORA_FILE, COMFYUI_FILE) if (run / name).is_file()]

    def status(self) -> str:
        job = self.job()
        if not job:
            return "no training job yet"
        steps = [r["step"] for r in self.losses() if r["series"] == "train"]
        where = f"{job['run_dir']}, step {max(steps) if steps else 0}"
        if self.running():
            return f"training (pid {job['pid']}): {where}"
        if job.get("stopped"):
            return f"stopped: {where} (Resume continues from the last checkpoint)"
        code = job.get("returncode")
        if self.adapters():
            return f"finished: {where}; adapter ready to download"
        return f"exited with code {code}: {where}; see the log" if code not in (None, 0) else f"not running: {where}"

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / LOG_FILE
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 20000))
            text = f.read().decode("utf-8", errors="replace")
        # Progress bars redraw with \r: keep the last state of each line.
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- the page


def build_app(workspace: Workspace, device: str | None = None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import pandas as pd

    def table(folder):
        try:
            rows = workspace.caption_rows(folder or None)
        except FileNotFoundError as err:
            raise gr.Error(str(err)) from err
        return pd.DataFrame(rows, columns=["image", "caption"]), gr.update(choices=[r[0] for r in rows], value=None)

    def upload(files, folder):
        if files:
            try:
                added = workspace.add_images([getattr(f, "name", f) for f in files])
            except (OSError, ValueError) as err:
                raise gr.Error(str(err)) from err
            gr.Info(f"added {len(added)} file(s) to {workspace.root / 'images'}")
        return (*table(""), "")

    def pick(name, folder):
        if not name:
            return ""
        caption = workspace.images_dir(folder or None) / Path(name).with_suffix(".txt").name
        return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""

    def save(name, text, folder):
        if not name:
            raise gr.Error("pick an image first")
        try:
            workspace.save_caption(name, text, folder or None)
        except OSError as err:
            raise gr.Error(str(err)) from err
        frame, _ = table(folder)
        return frame, f"saved {Path(name).with_suffix('.txt').name}"

    def preflight(folder, trigger, overrides, recaption_model):
        try:
            return workspace.preflight(folder or None, trigger or None, overrides.splitlines(), recaption_model or None)
        except Exception as err:  # shown in the page, not as a traceback
            raise gr.Error(f"pre-flight failed: {err}") from err

    def start(folder, trigger, rank, steps, lr, overrides, comfyui, recaption_model):
        try:
            workspace.start(
                folder or None, trigger or None, rank, steps, lr, overrides.splitlines(), comfyui=comfyui, device=device,
                recaption_model=recaption_model or None,
            )  # fmt: skip
        except (RuntimeError, OSError) as err:
            raise gr.Error(str(err)) from err
        return workspace.status()

    def stop():
        workspace.stop()
        return workspace.status()

    def resume():
        try:
            workspace.start(None, None, None, None, None, [], resume=True)
        except (RuntimeError, OSError) as err:
            raise gr.Error(str(err)) from err
        return workspace.status()

    def refresh(seen):
        """Status and log every tick; the plot, gallery and files only when they changed
        (re-sending them would redraw them every second)."""
        losses, previews, adapters = workspace.losses(), workspace.previews(), workspace.adapters()
        train = [r for r in losses if r["series"] == "train"]
        evals = [r for r in losses if r["series"] == "held-out"]
        now = {"train": len(train), "heldout": len(evals), "previews": previews, "adapters": adapters, "run": str(workspace.run_dir())}
        seen = seen or {}

        def frame(rows):
            return pd.DataFrame(rows, columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})

        def changed(key, value):
            if key in ("train", "heldout") and not now[key]:
                return gr.skip()
            return value if seen.get(key) != now[key] or seen.get("run") != now["run"] else gr.skip()

        return (
            workspace.status(),
            changed("train", frame(train)),
            changed("heldout", frame(evals)),
            changed("previews", previews),
            changed("adapters", adapters or None),
            workspace.log_tail(),
            now,
        )

    with gr.Blocks(title="imagemill: train a LoRA") as app:
        gr.Markdown("## Train a LoRA\nThe same training as `trainer lora`; it keeps running if you close this page.")
        with gr.Tab("1. Images and captions"):
            folder = gr.Textbox(label="Image folder (empty: the uploaded images in the work folder)", elem_id="folder")
            uploads = gr.File(label="Upload images (and .txt captions)", file_count="multiple", elem_id="upload")
            captions = gr.Dataframe(headers=["image", "caption"], interactive=False, label="Captions", elem_id="captions")
            with gr.Row():
                image_name = gr.Dropdown(label="Image", choices=[], elem_id="caption-image")
                caption_text = gr.Textbox(label="Caption", elem_id="caption-text")
            with gr.Row():
                save_button = gr.Button("Save caption", elem_id="save-caption")
                reload_button = gr.Button("Reload folder", elem_id="reload")
            saved = gr.Markdown(elem_id="caption-saved")
        with gr.Tab("2. Settings and pre-flight"):
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", value="sks", elem_id="trigger")
                rank = gr.Number(label="Rank", value=16, precision=0, elem_id="rank")
                steps = gr.Number(label="Steps", value=1000, precision=0, elem_id="steps")
                lr = gr.Number(label="Learning rate", value=1e-4, elem_id="lr")
            comfyui = gr.Checkbox(label="Also write a ComfyUI file", value=True, elem_id="comfyui")
            recaption_model = gr.Textbox(
                label="Recaption model (optional): captions images that have no caption with this VLM, as `trainer lora --recaption-model`",
                elem_id="recaption-model",
            )
            overrides = gr.Textbox(label="Advanced: `--set KEY=VALUE` overrides, one per line", lines=3, elem_id="overrides")
            preflight_button = gr.Button("Pre-flight check", elem_id="preflight")
            report = gr.Textbox(label="Pre-flight report (what trainer lora will train on)", lines=14, elem_id="preflight-report")
        with gr.Tab("3. Train"):
            with gr.Row():
                start_button = gr.Button("Start", variant="primary", elem_id="start")
                stop_button = gr.Button("Stop", elem_id="stop")
                resume_button = gr.Button("Resume", elem_id="resume")
            status = gr.Textbox(label="Status", elem_id="status")
            with gr.Row():
                # One series per plot: Gradio's LinePlot loses series added by later updates.
                loss = gr.LinePlot(x="step", y="loss", label="Training loss", elem_id="loss-plot", height=240)
                heldout = gr.LinePlot(x="step", y="loss", label="Held-out loss", elem_id="heldout-plot", height=240)
            gallery = gr.Gallery(label="Previews (newest first)", columns=4, elem_id="previews")
            adapters = gr.File(label="Adapter (diffusers, ComfyUI)", file_count="multiple", interactive=False, elem_id="adapters")
            log = gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="log")

        uploads.upload(upload, [uploads, folder], [captions, image_name, saved])
        reload_button.click(table, [folder], [captions, image_name])
        image_name.change(pick, [image_name, folder], [caption_text])
        save_button.click(save, [image_name, caption_text, folder], [captions, saved])
        preflight_button.click(preflight, [folder, trigger, overrides, recaption_model], [report])
        start_button.click(start, [folder, trigger, rank, steps, lr, overrides, comfyui, recaption_model], [status])
        stop_button.click(stop, [], [status])
        resume_button.click(resume, [], [status])
        seen = gr.State({})
        timer = gr.Timer(1.0)
        outputs = [status, loss, heldout, gallery, adapters, log, seen]
        timer.tick(refresh, [seen], outputs)
        app.load(refresh, [gr.State({})], outputs)
        app.load(table, [folder], [captions, image_name])
    return app


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model for `trainer lora --base` (a `trainer fit` run or its export)")
    parser.add_argument("--workdir", default="lora-ui", help="work folder: uploaded images, runs, job state (default ./lora-ui)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else is reachable by others: there is no authentication)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", help="torch device for training (default: cuda when available)")
    parser.set_defaults(func=cmd_ui)


def launch(app, workspace: Workspace, host: str, port: int, block: bool = True):
    """Serve `app`; with block=False returns once the server is up (tests)."""
    import gradio as gr

    # System fonts: the page must not fetch anything from the network.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    return app.queue().launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
        allowed_paths=[str(workspace.root.resolve())], theme=theme, prevent_thread_lock=not block,
        footer_links=[], pwa=False, ssr_mode=False,
    )  # fmt: skip


def cmd_ui(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    if args.host not in LOCAL_HOSTS:
        print(
            f"WARNING: binding {args.host}:{args.port}: anyone who can reach it can upload files, start training "
            "and download adapters; there is no authentication. Use 127.0.0.1 and an SSH tunnel instead.",
            file=sys.stderr,
        )
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("trainer ui: error: the UI needs Gradio: pip install 'imagemill[ui]'", file=sys.stderr)
        return 2
    base = Path(args.base)
    if not base.exists():
        print(f"trainer ui: error: --base {args.base}: no such folder", file=sys.stderr)
        return 2
    workspace = Workspace(Path(args.workdir), str(base.resolve()))
    app = build_app(workspace, device=args.device)
    print(f"trainer ui: http://{args.host}:{args.port}  (work folder {workspace.root.resolve()})", flush=True)
    launch(app, workspace, args.host, args.port)
    return 0
