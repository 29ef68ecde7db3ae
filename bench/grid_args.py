"""The command line the benchmarks share (which model, tasks, seeds, steps, CPUs or threads, rounds, `--smoke`) and
their set-up: the tasks' data fetched and the model converted (and, in-process, loaded) before anything is timed."""

from __future__ import annotations

import argparse
import os


def parse_with_smoke(p: argparse.ArgumentParser, argv: list[str] | None, smoke: dict) -> argparse.Namespace:
    """`p`'s arguments; with `--smoke`, `smoke` replaces the defaults (flags given still win): one short round of
    the smallest setting, so CI runs every benchmark end to end and a broken one fails there, not on a user."""
    p.add_argument("--smoke", action="store_true", help="one short round of the smallest setting (what CI runs): "
                   + ", ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in smoke.items()))
    if p.parse_args(argv).smoke:
        p.set_defaults(**smoke)
    return p.parse_args(argv)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_grid_args(p: argparse.ArgumentParser, tasks: list[str], steps: int, cpus_help: str, rounds: int) -> None:
    p.add_argument("--model", default=None, help="backbone (default: the bundled SmolLM2-135M)")
    p.add_argument("--tasks", nargs="+", default=tasks)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--cpus", type=int, default=2, help=f"{cpus_help} (default 2)")
    p.add_argument("--rounds", type=int, default=rounds, help=f"rounds, each running every side once (default {rounds})")


def prepared_model(args: argparse.Namespace) -> str:
    """The backbone to run, with its data and converted weights in place (not timed)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tpv.bundled import DEFAULT_BACKBONE, resolve_model_path
    from tpv.data_fetch import fetch
    from tpv.tasks import get_task

    model = args.model or DEFAULT_BACKBONE
    fetch([t for t in args.tasks if get_task(t).data is None])
    resolve_model_path(model)
    return model


def add_pass_args(p: argparse.ArgumentParser) -> None:
    """The in-process benchmarks of forward passes (`pack_passes`, `eval_passes`): one backbone, many prompts."""
    p.add_argument("--model", default=None, help="backbone (default: the bundled SmolLM2-135M)")
    p.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "tweets", "sms_spam", "trec"])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=2)


def loaded_backbone(args: argparse.Namespace):
    """`prepared_model`, loaded in this process with `--threads` torch threads."""
    import torch

    from tpv.backbone import Backbone, BackboneConfig

    model = prepared_model(args)
    torch.set_num_threads(args.threads)
    return Backbone.load(BackboneConfig(model=model))
