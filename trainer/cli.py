"""`specd train`, `specd distill`, `specd distill-eagle`, `specd refine-eagle`, `specd self-prompts`,
`specd prune-head` and `specd checkpoints` (added to the main CLI by add_subcommands)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from specdec.config import ConfigError, TrainerSettings, add_settings_flags, settings_from_args
from specdec.traces import DEFAULT_STREAM

log = logging.getLogger(__name__)


def _setup(settings: TrainerSettings) -> None:
    from specdec.logs import setup_logging
    from specdec.metrics import serve_metrics

    setup_logging("trainer", settings.log_level, settings.log_json)
    if settings.metrics_port and not settings.ray_address:
        serve_metrics(settings.metrics_port, settings.metrics_host)


def _settings(command: str, args: argparse.Namespace) -> TrainerSettings | None:
    try:
        settings = settings_from_args("trainer", args)
    except ConfigError as err:
        print(f"specd {command}: {err}", file=sys.stderr)
        return None
    _setup(settings)
    return settings


def _run(worker, args: argparse.Namespace) -> int:
    try:
        summary = worker.run(max_steps=args.max_steps, idle_exit_s=args.idle_exit_s)
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"steps": summary.steps, "traces": summary.traces, "decisions": summary.decisions}))
    return 0


def train_command(args: argparse.Namespace) -> int:
    settings = _settings("train", args)
    if settings is None:
        return 2
    if settings.ray_address:
        from trainer.ray_launch import launch

        summaries = launch(settings, max_steps=args.max_steps, idle_exit_s=args.idle_exit_s,
                           drafter_layers=args.drafter_layers)
        print(json.dumps(summaries, default=str))
        return 0
    from trainer.assemble import build_worker

    return _run(build_worker(settings, drafter_layers=args.drafter_layers), args)


def distill_command(args: argparse.Namespace) -> int:
    settings = _settings("distill", args)
    if settings is None:
        return 2
    # A batch job: every teacher trace is wanted, however long training takes.
    settings = settings.model_copy(update={"max_trace_age_s": 0.0})
    from specdec.compute import gguf_blocks, small_gemm
    from trainer.assemble import build_worker, load_target
    from trainer.bootstrap import distill_prompt_file

    target = load_target(settings)
    if target.tokenizer is None:
        print(f"specd distill: target {settings.target!r} has no tokenizer to encode prompts with", file=sys.stderr)
        return 2
    worker = build_worker(settings, drafter_layers=args.layers, target=target)
    if target.device.type == "cpu":  # after the drafter is cut from it; batched greedy decoding is the kernel's case
        if small_gemm.install(target.model) and target.gguf_path:
            gguf_blocks.attach(target.model, target.gguf_path)
    summary = distill_prompt_file(
        target.model, target.tokenizer, worker, args.prompts, max_prompts=args.max_prompts,
        use_chat_template=not args.raw, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        top_k=args.top_k, generation_batch=args.generation_batch, target_version=target.version,
        epochs=args.epochs,
    )
    print(json.dumps({"prompts": summary.prompts, "traces": summary.traces, "steps": summary.steps,
                      "decisions": summary.decisions, "current": worker.store.current()}))
    return 0


def prune_head_command(args: argparse.Namespace) -> int:
    from specdec import redisutil
    from specdec.models.checkpoints import CheckpointError, CheckpointStore, parse_version
    from trainer.prune_head import prune_checkpoint, recent_traces

    client = redisutil.connect(args.redis_url)
    store = CheckpointStore(args.checkpoint_dir, redis_client=client)
    try:
        version = parse_version(args.version) if args.version else store.current()
        if version is None:
            print(f"specd prune-head: {args.checkpoint_dir} has no CURRENT checkpoint; pass --version", file=sys.stderr)
            return 2
        records = recent_traces(client, args.stream, args.traces)
        report = prune_checkpoint(store, version, args.head_vocab, records, promote=args.promote)
    except (CheckpointError, ValueError) as err:
        print(f"specd prune-head: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


def distill_eagle_command(args: argparse.Namespace) -> int:
    from specdec import redisutil
    from specdec.logs import setup_logging
    from specdec.models.checkpoints import CheckpointStore
    from specdec.models.loader import configure_threads, load_model
    from trainer.eagle import distill_feature_drafter, teacher_records
    from trainer.prune_head import recent_traces

    setup_logging("trainer", "info", False)
    configure_threads(args.threads)
    client = redisutil.connect(args.redis_url)
    target = load_model(args.target)
    traces = args.traces if args.traces is not None else (0 if args.prompts else 20_000)
    records = recent_traces(client, args.stream, traces) if traces else []
    known = {}
    if args.prompts:
        new, known = teacher_records(target, args.prompts, client, args.stream, args.max_new_tokens,
                                     args.generation_batch)
        records += new
    store = CheckpointStore(args.checkpoint_dir, redis_client=client)
    try:
        report = distill_feature_drafter(
            target.model, records, store, head_vocab=args.head_vocab, holdout=args.holdout, promote=args.promote,
            target_version=target.version, tokenizer_fingerprint=target.fingerprint, known_features=known,
            epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, time_limit_s=args.time_limit_s)
    except ValueError as err:
        print(f"specd distill-eagle: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


def refine_eagle_command(args: argparse.Namespace) -> int:
    """The trainer worker with the EAGLE strategy: rounds on the trace stream's consumer group."""
    settings = _settings("refine-eagle", args)
    if settings is None:
        return 2
    from specdec.models.checkpoints import CheckpointError
    from trainer.assemble import build_eagle_worker

    try:
        return _run(build_eagle_worker(settings), args)
    except CheckpointError as err:
        print(f"specd refine-eagle: {err}", file=sys.stderr)
        return 1


def self_prompts_command(args: argparse.Namespace) -> int:
    from specdec.logs import setup_logging
    from specdec.models.loader import configure_threads, load_model
    from trainer.bootstrap import normalized_prompt, read_prompts, sample_user_turns

    setup_logging("trainer", "info", False)
    configure_threads(args.threads)
    target = load_model(args.target)
    exclude = {normalized_prompt(item.prompt) for path in args.exclude for item in read_prompts(path)}
    texts = sample_user_turns(target.model, target.tokenizer, args.count, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, batch=args.batch, seed=args.seed,
                              exclude=exclude)
    with open(args.out, "w") as out:
        for number, text in enumerate(texts, start=1):
            out.write(json.dumps({"id": f"self-{args.seed}-{number:05d}", "category": "self", "prompt": text}) + "\n")
    print(json.dumps({"prompts": len(texts), "out": args.out, "excluded": len(exclude)}))
    return 0 if texts else 1


def checkpoints_command(args: argparse.Namespace) -> int:
    from specdec import redisutil
    from specdec.models.checkpoints import CheckpointError, CheckpointStore, parse_version

    client = redisutil.connect(args.redis_url) if args.redis_url else None
    store = CheckpointStore(args.checkpoint_dir, redis_client=client)
    try:
        if args.action == "list":
            current = store.current()
            statuses = store.statuses()
            rows = []
            for version in store.versions():
                meta = store.meta(version)
                rows.append({"version": f"v{version}", "current": version == current, "status": statuses[version],
                             "parent": meta.get("parent_version"), "steps": meta.get("steps"),
                             "created_ms": meta.get("created_ms")})
            if args.json:
                print(json.dumps(rows))
            else:
                for row in rows:
                    marker = "*" if row["current"] else " "
                    print(f"{marker} {row['version']:>6}  {row['status']:<8}  parent={row['parent']}  steps={row['steps']}")
            return 0
        if args.version is None:
            print(f"specd checkpoints {args.action}: --version is required", file=sys.stderr)
            return 2
        version = parse_version(args.version)
        store.verify(version)  # never point drafters at a damaged checkpoint
        if args.action == "export":
            return _export(store, version, args)
        if args.action == "promote":
            store.promote(version, args.reason or "manual promotion", {})
        else:
            store.rollback(version, args.reason or "manual rollback", {})
        print(f"CURRENT = v{store.current()}")
        return 0
    except (CheckpointError, ValueError) as err:
        print(f"specd checkpoints: {err}", file=sys.stderr)
        return 1


def _export(store, version: int, args: argparse.Namespace) -> int:
    """A compact copy of a version: without the tensors it shares with the target, the rest float16."""
    from pathlib import Path

    from specdec.models.shared_weights import export_compact

    if not args.out:
        print("specd checkpoints export: --out is required", file=sys.stderr)
        return 2
    source = store.path(version)
    out = Path(args.out)
    report = export_compact(source, out, args.target)
    meta = {**store.meta(version), "exported_from": str(source), "shared_with": args.target}
    meta.pop("files", None)  # the hashes were of the full files
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    print(json.dumps(report))
    return 0


def _worker_flags(parser: argparse.ArgumentParser, steps: str) -> None:
    add_settings_flags(parser, "trainer")
    parser.add_argument("--max-steps", type=int, default=None, help=f"stop after this many {steps}")
    parser.add_argument("--idle-exit-s", type=float, default=None, help="stop after this long without traces")


def add_subcommands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the drafter online from the trace stream")
    _worker_flags(train, "optimisation steps")
    train.add_argument("--drafter-layers", type=int, default=4,
                       help="decoder layers of a drafter initialised from the target")
    train.set_defaults(handler=train_command)

    distill = subparsers.add_parser("distill", help="bootstrap the drafter from a prompt file (same pipeline)")
    add_settings_flags(distill, "trainer")
    distill.add_argument("--prompts", required=True, help="JSON Lines of {id, category, prompt}")
    distill.add_argument("--max-new-tokens", type=int, default=64)
    distill.add_argument("--layers", type=int, default=4, help="decoder layers of a drafter initialised from the target")
    distill.add_argument("--block-size", type=int, default=8, help="draft tokens per trace")
    distill.add_argument("--top-k", type=int, default=16, help="target probabilities kept per position")
    distill.add_argument("--generation-batch", type=int, default=8, help="prompts generated together")
    distill.add_argument("--max-prompts", type=int, default=None)
    distill.add_argument("--epochs", type=int, default=1,
                         help="passes over the teacher traces (the target generates them once)")
    distill.add_argument("--raw", action="store_true", help="skip the chat template")
    distill.set_defaults(handler=distill_command)

    prune = subparsers.add_parser("prune-head", help="publish a drafter whose LM head keeps only frequent tokens")
    prune.add_argument("--checkpoint-dir", required=True)
    prune.add_argument("--version", default=None, help="N or vN to prune (default: CURRENT)")
    prune.add_argument("--head-vocab", type=int, required=True, help="tokens the pruned head keeps")
    prune.add_argument("--redis-url", default="embedded", help="where the trace stream that ranks tokens lives")
    prune.add_argument("--stream", default=DEFAULT_STREAM)
    prune.add_argument("--traces", type=int, default=20_000, help="newest traces to rank tokens on")
    prune.add_argument("--promote", action="store_true", help="make the pruned version CURRENT")
    prune.set_defaults(handler=prune_head_command)

    eagle = subparsers.add_parser("distill-eagle", help="train a feature-level (EAGLE) drafter on the trace stream")
    eagle.add_argument("--target", default="smollm2-135m")
    eagle.add_argument("--checkpoint-dir", required=True, help="its own store: drafters never swap between kinds")
    eagle.add_argument("--redis-url", default="embedded", help="where the trace stream lives")
    eagle.add_argument("--stream", default=DEFAULT_STREAM)
    eagle.add_argument("--traces", type=int, default=None,
                       help="newest traces of the stream to learn from (default 20,000; 0 with --prompts)")
    eagle.add_argument("--prompts", action="append", default=None,
                       help="JSON Lines of {id, category, prompt}: also learn from the target's greedy continuations "
                            "of these (repeatable; the teacher traces are appended to the stream)")
    eagle.add_argument("--max-new-tokens", type=int, default=64, help="continuation length with --prompts")
    eagle.add_argument("--generation-batch", type=int, default=32, help="prompts generated together")
    eagle.add_argument("--head-vocab", type=int, default=16384, help="tokens the draft head keeps (0: all)")
    eagle.add_argument("--holdout", type=int, default=40, help="newest requests kept out of training")
    eagle.add_argument("--epochs", type=float, default=8.0)
    eagle.add_argument("--lr", type=float, default=1e-3)
    eagle.add_argument("--batch-size", type=int, default=8)
    eagle.add_argument("--time-limit-s", type=float, default=None, help="stop training after this long")
    eagle.add_argument("--threads", type=int, default=2)
    eagle.add_argument("--promote", action="store_true", help="make the new version CURRENT")
    eagle.set_defaults(handler=distill_eagle_command)

    refine = subparsers.add_parser("refine-eagle", help="keep fine-tuning a served EAGLE drafter on the trace stream "
                                                        "(the trainer worker's EAGLE strategy), promoting only "
                                                        "versions that accept more")
    _worker_flags(refine, "rounds")
    refine.set_defaults(handler=refine_eagle_command)

    selfp = subparsers.add_parser("self-prompts", help="write a prompt file of requests the target writes itself")
    selfp.add_argument("--target", default="smollm2-135m")
    selfp.add_argument("--count", type=int, required=True)
    selfp.add_argument("--out", required=True, help="JSON Lines of {id, category, prompt}")
    selfp.add_argument("--exclude", action="append", default=[],
                       help="prompt files none may equal, case and spacing aside (bench/prompts/suite.jsonl, say)")
    selfp.add_argument("--max-tokens", type=int, default=48, help="longest request kept, in tokens")
    selfp.add_argument("--temperature", type=float, default=1.0)
    selfp.add_argument("--top-p", type=float, default=0.95)
    selfp.add_argument("--batch", type=int, default=64)
    selfp.add_argument("--seed", type=int, default=0)
    selfp.add_argument("--threads", type=int, default=2)
    selfp.set_defaults(handler=self_prompts_command)

    checkpoints = subparsers.add_parser("checkpoints", help="list, promote, roll back or export drafter checkpoints")
    checkpoints.add_argument("action", choices=["list", "promote", "rollback", "export"])
    checkpoints.add_argument("--checkpoint-dir", required=True)
    checkpoints.add_argument("--version", default=None, help="N or vN")
    checkpoints.add_argument("--reason", default="")
    checkpoints.add_argument("--redis-url", default="", help="also notify drafters through Redis")
    checkpoints.add_argument("--json", action="store_true")
    checkpoints.add_argument("--target", default="smollm2-135m",
                             help="export: the target whose tensors the compact copy leaves out")
    checkpoints.add_argument("--out", default=None, help="export: directory of the compact copy")
    checkpoints.set_defaults(handler=checkpoints_command)
