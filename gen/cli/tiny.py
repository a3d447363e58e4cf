"""``gen train-tiny`` and ``gen eval-tiny``: the built-in shapes models, trained and scored."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, overrides, print_path, print_written, setup_logging


@app.command("train-tiny")
def train_tiny(
    causal: bool = typer.Option(False, "--causal", help="train shapes-wan-causal from shapes-wan (diffusion forcing)"),
    out: Path = opt.out(help="pipeline folder to write (default: the bundled folder, replaced atomically when "
                        "training ends)"),
    base: Path = typer.Option(None, help="--causal: the shapes-wan folder to start from (default: the bundled one)"),
    seed: int = opt.seed(0, "training seed (the shipped weights use 0)"),
    set_: list[str] = opt.set_("training setting key=value, e.g. dit.steps=40000 or dit.clip_shift=3 (repeatable; "
                               "the keys are the fields of gen.pipelines.shapes.config.TrainConfig)"),
    vae: Path = typer.Option(None, "--vae", help="keep the VAE of this shapes-wan folder instead of training one "
                             "(skips about 10 minutes on 2 CPU cores)"),
    restart: bool = typer.Option(False, "--restart", help="discard the checkpoints of an unfinished run (OUT.partial/) "
                                 "instead of resuming it"),
    snapshot: Path = typer.Option(None, "--snapshot", help="do not train: save the unfinished run at --out as it "
                                  "stands (EMA weights of its last checkpoint) as a pipeline folder here, for "
                                  "gen eval-tiny --model-path; the run resumes as before"),
    device: str = opt.device(),
    verbose: bool = opt.verbose(),
) -> None:
    """Train the built-in shapes-wan model (or its causal variant) from its seed: about two hours on 2 CPU cores.

    A stopped run resumes where it was when started again with the same settings: the VAE,
    the encoded clips and the transformer's state every 250 steps are kept in OUT.partial/
    until the folder is published."""
    import dataclasses
    import logging

    from gen.pipelines import bundled_folder
    from gen.pipelines.shapes.build import train_shapes_wan, train_shapes_wan_causal
    from gen.pipelines.shapes.config import TrainConfig, override_config

    setup_logging(verbose)
    if snapshot is not None:
        from gen.pipelines.shapes.build import snapshot_shapes_wan

        if causal or out is None:
            raise ValueError("--snapshot reads the unfinished text-to-video run at --out: give --out (and not --causal).")
        print_written(snapshot_shapes_wan(out, snapshot))
        return
    cfg = override_config(dataclasses.replace(TrainConfig(), seed=seed), set_ or [])
    if set_:
        logging.getLogger("gen.pipelines.shapes").info("training settings changed: %s", ", ".join(set_))
    if causal and vae is not None:
        raise ValueError("--vae is for the text-to-video model; --causal keeps the VAE of --base.")
    name = "shapes-wan-causal" if causal else "shapes-wan"
    target = out or bundled_folder(name)
    if causal:
        path = train_shapes_wan_causal(target, base=base or bundled_folder("shapes-wan"), config=cfg, device=device,
                                       restart=restart)
    else:
        path = train_shapes_wan(target, config=cfg, device=device, vae=vae, restart=restart)
    print_written(path)
    if out is not None:
        console.print("use it with:", highlight=False)
        print_path(f"--model {name} --model-path {path}")


@app.command("eval-tiny")
def eval_tiny_cmd(
    model: str = opt.model(help="shapes model to score"),
    attention: str = opt.attention(),
    set_: list[str] = opt.set_(),
    steps: int = opt.steps(),
    guidance: float = opt.guidance(),
    seeds: int = typer.Option(2, help="held-out generator seeds per caption"),
    per_motion: int = typer.Option(4, help="captions per motion (6 motions)"),
    model_path: Path = opt.model_path("score this pipeline folder instead of the bundled weights"),
    device: str = opt.device(),
    json_out: Path = opt.json_out("write every clip's reading and the scores as JSON here"),
    markdown: Path = opt.markdown("write the score table here"),
    strip: Path = typer.Option(None, help="write a PNG strip of the first 12 clips here"),
    long: bool = typer.Option(False, "--long", help="score long videos of shapes-wan-causal per gen long schedule"),
    seconds: float = opt.seconds(12.0, "--long: video length in seconds"),
    verbose: bool = opt.verbose(),
) -> None:
    """Render held-out seeds of a shapes model and score colour, background, shape and motion."""
    from gen._io import atomic_write_text
    from gen.eval_tiny import eval_long, eval_tiny
    from gen.pipelines.shapes.vision import ATTRIBUTES

    setup_logging(verbose)
    path = str(model_path) if model_path else None
    if long:
        name = model if model != "shapes-wan" else "shapes-wan-causal"
        results = eval_long(name, seconds=seconds, seeds=seeds, per_motion=per_motion, device=device, model_path=path)
    else:
        results = {"": eval_tiny(model, attention=attention, overrides=overrides(attention, set_), steps=steps,
                                 guidance=guidance, seeds=seeds, per_motion=per_motion, device=device,
                                 model_path=path, strip=strip)}
    for key, res in results.items():
        m = res.meta
        title = (f"{m['model']} / gen long --schedule {key}: {m['clips']} videos of {m['seconds']:g} s" if long else
                 f"{m['model']} / {m['attention']}: {m['clips']} clips, {m['steps']} steps, guidance "
                 f"{m['guidance']} ({m['seconds']:.0f} s on {m['device']})")
        table = Table(title=title)
        for col in ("motion", "clips", "colour", "background", "shape", "motion ok", "colour and motion",
                    "one object"):
            table.add_column(col, justify="left" if col == "motion" else "right")
        for motion, sc in [*res.by_motion.items(), ("all", res.summary)]:
            n = len(res.rows) if motion == "all" else sum(r["motion_of_caption"] == motion for r in res.rows)
            table.add_row(motion, str(n), *(f"{100 * sc[a]:.0f}%" for a in ATTRIBUTES))
        console.print(table)
    if json_out:
        text = (results[""].to_json() if not long else
                "{" + ",".join(f'"{k}": {r.to_json()}' for k, r in results.items()) + "}")
        atomic_write_text(json_out, text)
    if markdown:
        atomic_write_text(markdown, "\n\n".join((f"**{k}**\n\n" if k else "") + r.markdown()
                                                 for k, r in results.items()) + "\n")
    print_written(json_out, markdown, strip if strip is not None and strip.exists() else None)
