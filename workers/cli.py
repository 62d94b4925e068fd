"""The ``gpufleet`` command line: worker, submit, load, unload, status, plan, models, bench, demo, api.

Each command imports what it needs when it runs, so producer-side commands (submit, status, plan) work on a
machine without torch.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_FAILED = 1

DESCRIPTION = (
    "Serve many Hugging Face models on a fleet of mixed GPUs through a Celery task queue: run workers, send jobs, "
    "plan models onto GPU types and watch the fleet."
)
"""What ``gpufleet --help`` says first: plain text for a terminal (the module docstring is reStructuredText)."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _summarise(result: dict[str, Any]) -> dict[str, Any]:
    """A result for a person: long embedding lists shortened."""
    shown = dict(result)
    if "embeddings" in shown:
        shown["embeddings"] = [[round(x, 4) for x in vector[:4]] + ["..."] for vector in shown["embeddings"]]
    return shown


def load_progress(async_result: Any) -> tuple[int, int] | None:
    """``(bytes_done, bytes_total)`` while the job reports a model load, else ``None``.

    State and progress come from one read of the task's meta: read apart (``.state`` then ``.info``), a job that
    finished in between yields its result as the "progress", drawn as a stray ``0/0 MiB`` bar.
    """
    meta = async_result.backend.get_task_meta(async_result.id)
    info = meta.get("result")
    if meta.get("status") != "PROGRESS" or not isinstance(info, dict):
        return None
    done, total = info.get("bytes_done"), info.get("bytes_total")
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return None
    return done, total


def _progress_bar(done_bytes: int, total_bytes: int, width: int = 30) -> str:
    filled = int(width * min(done_bytes, total_bytes) / total_bytes)
    return f"\rloading [{'#' * filled}{'.' * (width - filled)}] {done_bytes / 2**20:.1f}/{total_bytes / 2**20:.1f} MiB"


def _timeout_message(async_result: Any, timeout_s: float) -> str:
    """Why no result came: still running (wait longer), or waiting on a queue no worker takes it from (and what to
    do about that queue)."""
    from gpufleet.tasks.client import route_of
    from gpufleet.tasks.contracts import Rerouted
    from gpufleet.tasks.names import is_cpu_queue

    meta = async_result.backend.get_task_meta(async_result.id)
    route = route_of(async_result)
    moved = Rerouted.from_meta(meta)
    if moved is not None:  # this attempt's worker gave it away: where it waits now, not a stale "still running"
        return (
            f"no result within {timeout_s:g} s: {moved.describe(async_result.id)}; no worker has taken it from there "
            "yet. Check which workers are live (`gpufleet status`); the job runs once one takes it"
        )
    if meta.get("status") in ("STARTED", "PROGRESS"):
        on = f" on {meta['worker']}" if meta.get("worker") else ""
        return (
            f"job {async_result.id} is still running{on} after {timeout_s:g} s: wait longer with --timeout, or "
            "see what the worker is doing with `gpufleet status`"
        )
    if route is None:
        where, start = "its queue", "a worker for it"
    else:
        where = f"queue {route.queue!r} ({route.reason})"
        on_gpu = f" on a {route.gpu_type} GPU" if route.gpu_type else ""
        cpu = is_cpu_queue(route.queue)
        start = "`gpufleet worker --cpu`" if cpu else f"`gpufleet worker --gpu N`{on_gpu}"
    return (
        f"no result for job {async_result.id} within {timeout_s:g} s: it is still waiting on {where} and no worker "
        f"has taken it. Check which workers are live and what they consume (`gpufleet status`, `gpufleet plan "
        f"--live MODEL`); start {start} if none is, or send it elsewhere with --queue. The job stays queued and "
        "runs once a worker takes it"
    )


WAITING_NOTICE_S = 1.0
"""A job not started after this long gets one line saying where it waits and why (a job on a warm worker has
started long before: the line is for the one waiting behind a load, a warm-up or a backlog)."""


def waiting_notice(async_result: Any, waited_s: float) -> str | None:
    """Where a job still waits on its queue and why, for a person; None once it has started (or finished)."""
    from gpufleet.tasks.client import route_of

    meta = async_result.backend.get_task_meta(async_result.id)
    if meta.get("status") != "PENDING":
        return None
    route = route_of(async_result)
    head = f"job {async_result.id} has not started after {waited_s:g} s"
    if route is None:
        return f"{head}: it waits on its queue until a worker takes it"
    return f"{head}: it waits on queue {route.queue!r}, where the router sent it: {route.reason}"


def _wait(async_result: Any, timeout_s: float, *, progress: bool = False) -> dict[str, Any]:
    from gpufleet.tasks.contracts import Rerouted
    from gpufleet.tasks.errors import FleetError

    begun = time.monotonic()
    deadline = begun + timeout_s
    drawn = False
    told: Rerouted | None = None
    shown: tuple[int, int] | None = None  # the bar's last frame
    noticed = False
    while not async_result.ready():
        if time.monotonic() > deadline:
            raise FleetError(_timeout_message(async_result, timeout_s))
        if not noticed and time.monotonic() - begun >= WAITING_NOTICE_S:  # said once, if it still waits then
            noticed = True
            notice = waiting_notice(async_result, WAITING_NOTICE_S)
            if notice is not None:
                sys.stderr.write(("\n" if drawn else "") + notice + "\n")
                drawn = False
        moved = Rerouted.from_meta(async_result.backend.get_task_meta(async_result.id))
        if moved is not None and moved != told:  # said once per re-route, on a line of its own
            sys.stderr.write(("\n" if drawn else "") + moved.describe(async_result.id) + "\n")
            told, drawn = moved, False
        loading = load_progress(async_result) if progress else None
        if loading is not None:
            sys.stderr.write(_progress_bar(*loading))
            sys.stderr.flush()
            drawn, shown = True, loading
        time.sleep(0.1)
    if drawn:
        if shown is not None and async_result.successful():
            # A load faster than the polling ends between two frames: draw the last one, not "0.0/86.6 MiB".
            sys.stderr.write(_progress_bar(shown[1], shown[1]))
        sys.stderr.write("\n")  # end the bar's line; nothing to end when no bar was drawn
    value: dict[str, Any] = async_result.get(timeout=1.0, propagate=True)
    return value


def cmd_worker(args: argparse.Namespace) -> int:
    from gpufleet.workers.main import run_worker

    run_worker(gpu=args.gpu, gpus=args.gpus, cpu=args.cpu, name=args.name, loglevel=args.loglevel)
    return 0


def _client() -> Any:
    from gpufleet.tasks.client import FleetClient

    return FleetClient()


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client()
    if args.kind == "embed":
        result = client.embed(args.model, list(args.texts), normalize=not args.no_normalize, queue=args.queue)
    else:
        options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        if args.seed is not None:
            options["seed"] = args.seed
        if args.message:
            options["messages"] = [_message(m) for m in args.message]
        else:
            options["prompt"] = args.prompt
        if args.stop:
            options["stop"] = list(args.stop)
        if args.stream:
            return _stream(client, args, options)
        result = client.generate(args.model, queue=args.queue, **options)
    if args.no_wait:
        print(result.id)
        return 0
    # A job whose model is not resident reports its load as PROGRESS: shown as a bar unless --json.
    value = _wait(result, args.timeout, progress=not args.json)
    _print_json(value if args.json else _summarise(value))
    return 0


def _stream(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print a generate job's text as it comes (Ctrl-C cancels the job), then the result's summary on stderr."""
    from gpufleet.tasks.streams import StreamDelta

    final: dict[str, Any] = {}
    for item in client.generate_stream(args.model, queue=args.queue, timeout_s=args.timeout, **options):
        if isinstance(item, StreamDelta):
            if not args.json:
                sys.stdout.write(item.text)
                sys.stdout.flush()
        else:
            final = item
    if args.json:
        _print_json(final)
    else:
        sys.stdout.write("\n")
        summary = {k: final.get(k) for k in ("completion_tokens", "finish_reason", "worker")}
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    return 0


def _message(text: str) -> dict[str, str]:
    role, sep, content = text.partition(":")
    if not sep:
        raise SystemExit(f"--message takes ROLE:CONTENT (e.g. user:Hello), got {text!r}")
    return {"role": role.strip(), "content": content.strip()}


def cmd_load(args: argparse.Namespace) -> int:
    result = _client().load_model(args.model, priority=args.priority, queue=args.queue)
    _print_json(_wait(result, args.timeout, progress=not args.json))
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    result = _client().unload_model(args.model, queue=args.queue)
    _print_json(_wait(result, args.timeout))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not args.control:
        # The registry the workers' heartbeats fill: one Redis read, no broadcast to wait on, no Celery import.
        from gpufleet.tasks.fleet import FleetRegistry, describe, registry_url
        from gpufleet.tasks.settings import get_settings, redact_url

        url = registry_url(get_settings())
        if url is None:
            print(
                "gpufleet status: no fleet registry: neither GPUFLEET_BROKER_URL nor GPUFLEET_RESULT_BACKEND is "
                "Redis; use a Redis result backend, or ask the workers directly with `gpufleet status --control`",
                file=sys.stderr,
            )
            return EXIT_FAILED
        fleet = FleetRegistry(url, cache_s=0, connect_timeout_s=args.timeout).snapshot()
        live = fleet.live()
        if args.json:
            _print_json([worker.model_dump(mode="json") for worker in live])
            return 0
        if not live:
            print(
                f"no live workers in the fleet registry at {redact_url(url)}: start one (`gpufleet worker --cpu` or "
                "`--gpu N`) with this GPUFLEET_BROKER_URL, or see `gpufleet status --control`"
            )
            return EXIT_FAILED
        for worker in live:
            print(describe(worker, now=fleet.read_at))
        return 0
    return _status_control(args)


def _status_control(args: argparse.Namespace) -> int:
    """``gpufleet status --control``: every worker's own answer, one broadcast, read through the typed replies."""
    from gpufleet.gpu.units import fmt_bytes
    from gpufleet.workers.common.snapshot import WorkerStatusReply

    client = _client()
    replies = {
        name: WorkerStatusReply.model_validate(reply)
        for name, reply in client.status("worker_status", timeout_s=args.timeout, limit=_live_count()).items()
    }
    if args.json:
        _print_json(
            {
                section: {name: getattr(reply, key).model_dump(mode="json") for name, reply in replies.items()}
                for section, key in (("gpu_status", "gpu"), ("models_status", "models"), ("cache_status", "cache"))
            }
        )
        return 0
    if not replies:
        print("no workers answered (are they running, and on this broker?)")
        return EXIT_FAILED
    for name, reply in sorted(replies.items()):
        gpu = reply.gpu
        print(f"{name}: {'ready' if gpu.ready else 'NOT READY'}  {gpu.device}  dtype={gpu.dtype}  jobs={gpu.jobs_done}")
        print(f"  queues: {', '.join(gpu.queues)}")
        for model in reply.models.loaded:
            print(f"  model {model.model}: {fmt_bytes(model.bytes)}{' (pinned)' if model.pinned else ''}")
        parked = reply.cache.parked.entries if reply.cache.parked is not None else []
        for entry in parked:
            print(f"  parked {entry.model}: {fmt_bytes(entry.bytes)} (host memory)")
        stats = reply.cache.stats
        print(
            f"  cache: hits={stats.hits} misses={stats.misses} evictions={stats.evictions} "
            f"hit_ratio={stats.hit_ratio:.2f} (per job)"
        )
    return 0


def _live_count() -> int | None:
    """How many workers the registry says are live (replies to wait for), or None when it cannot say."""
    from gpufleet.tasks.fleet import FleetRegistry, registry_url
    from gpufleet.tasks.settings import get_settings

    url = registry_url(get_settings())
    if url is None:
        return None
    try:
        return len(FleetRegistry(url, cache_s=0, connect_timeout_s=1.0).snapshot().live()) or None
    except Exception:  # the broadcast still works without it: it then waits its whole timeout
        return None


def _plan_live(model: str, settings: Any, *, as_json: bool) -> int:
    """``gpufleet plan --live``: the router's decision for ``model`` and the live fleet it was made on."""
    from gpufleet.gpu.units import fmt_bytes
    from gpufleet.tasks.errors import RoutingError
    from gpufleet.tasks.live_routing import RouteDecision
    from gpufleet.tasks.routing import LiveRouter

    router = LiveRouter(settings)
    fleet = router.fleet()
    workers = () if fleet is None else fleet.live()
    decision: RouteDecision | None = None
    error = None
    try:
        decision = router.decide(model)
    except RoutingError as exc:
        error = str(exc)
    if as_json:
        _print_json(
            {
                "model": model,
                "decision": None if decision is None else decision.to_dict(),
                "error": error,
                "fleet": None if fleet is None else [w.model_dump(mode="json") for w in workers],
            }
        )
        return EXIT_FAILED if error else 0
    print(f"plan for {model} on the live fleet")
    if fleet is None:
        print("fleet: not read (routing by GPU type)")
    else:
        print(f"fleet: {len(workers)} live worker(s), {len(fleet.ready())} ready")
    for worker in workers:
        held = [f"{m.model} ({fmt_bytes(m.bytes)}{', pinned' if m.pinned else ''})" for m in worker.resident]
        parked = [m.model for m in worker.parked]
        print(
            f"  {worker.name}: {worker.gpu_count} x {worker.gpu_type}  {'ready' if worker.ready else 'NOT READY'}  "
            f"budget {fmt_bytes(worker.memory_budget_bytes)}, used {fmt_bytes(worker.memory_used_bytes)}  "
            f"backlog {worker.backlog}  queues {worker.type_queue}, {worker.direct_queue}"
        )
        print(f"    resident: {', '.join(held) or 'none'}" + (f"  parked: {', '.join(parked)}" if parked else ""))
    if decision is None:
        print(f"gpufleet plan: RoutingError: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"queue: {decision.queue}")
    print(f"worker: {decision.worker or '(shared queue: any worker consuming it)'}")
    print(f"why: {decision.reason}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gpufleet.gpu.plan.report import render_placement
    from gpufleet.gpu.plan.selection import Placement, plan
    from gpufleet.tasks.errors import ModelNotFoundError
    from gpufleet.tasks.names import gpu_type_queue
    from gpufleet.tasks.planning import fleet_gpu_types, placement_for
    from gpufleet.tasks.settings import get_settings

    settings = get_settings()
    if args.live:
        return _plan_live(args.model, settings, as_json=args.json)
    options: dict[str, Any] = {
        "context_length": args.context_length,
        "batch_size": args.batch_size,
        "prefer": args.prefer,
    }
    allowed = None if args.all_types else fleet_gpu_types(settings)
    placement: Placement
    if Path(args.model).exists():
        placement = plan(Path(args.model), allowed_types=allowed, **options)
    else:
        try:
            # The router's own function and settings: the plan names the type a job would be routed to.
            placement = placement_for(args.model, settings, all_types=args.all_types, **options)
        except ModelNotFoundError as exc:
            print(f"gpufleet plan: note: {exc}. Planned from its name instead", file=sys.stderr)
            placement = plan(args.model, allowed_types=allowed, **options)
    queue = gpu_type_queue(placement.gpu_type)
    if args.json:
        _print_json({**placement.to_dict(), "queue": queue})
    else:
        fleet = "every catalog GPU type" if allowed is None else ", ".join(allowed)
        rows = [("queue", queue), ("planned onto", fleet + ("" if allowed is None else " (GPUFLEET_FLEET__GPU_TYPES)"))]
        print(render_placement(placement, model=args.model, extra_rows=rows))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "make-demo":
        from gpufleet.workers.tools.demo_models import make_demo_models

        for model in make_demo_models(Path(args.root), force=args.force):
            print(f"{model.model_id}: {model.path} ({model.kind.value}, {model.bytes / 2**20:.1f} MiB)")
        return 0
    from gpufleet.gpu.repository import list_models
    from gpufleet.tasks.settings import get_settings

    root = Path(args.root) if args.root else get_settings().model_root
    if root is None:
        print("no model root: pass ROOT or set GPUFLEET_MODEL_ROOT", file=sys.stderr)
        return EXIT_USAGE
    if not root.is_dir():
        print(
            f"gpufleet models list: {root} is not a directory: pass the model root (GPUFLEET_MODEL_ROOT), or fill "
            f"one with `gpufleet models make-demo {root}`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    found = list_models(root)
    for model_id in found:
        print(model_id)
    if not found:
        print(
            f"gpufleet models list: no models under {root} (a model is a directory ORG/NAME holding a config.json "
            f"or a .gguf file); `gpufleet models make-demo {root}` adds the demo models",
            file=sys.stderr,
        )
    return 0


def cmd_bench(bench_args: Sequence[str]) -> int:
    """Run the loading benchmark with its own options (its parser prints its ``--help``)."""
    from gpufleet.workers.tools.bench import main as bench_main

    return int(bench_main(list(bench_args)))


def cmd_demo(args: argparse.Namespace) -> int:
    from gpufleet.workers.tools.demo import run_demo

    return run_demo(workdir=Path(args.workdir), gpu=args.gpu, keep=args.keep)


def cmd_api(args: argparse.Namespace) -> int:
    from gpufleet.tasks.settings import get_settings

    try:
        from gpufleet.tasks.api.app import serve
    except ModuleNotFoundError as exc:  # the API's libraries are an extra, not the producer's base install
        print(f"gpufleet api: needs the api extra (`pip install 'gpufleet[api]'`): {exc}", file=sys.stderr)
        return EXIT_FAILED
    serve(get_settings(), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a worker pinned to one GPU, several GPUs or the CPU")
    device = worker.add_mutually_exclusive_group(required=True)
    device.add_argument("--gpu", type=int, metavar="N", help="physical GPU index (NVML / PCI order)")
    device.add_argument(
        "--gpus",
        metavar="N,M",
        help="several physical GPUs of one type, one worker: models are split across them (--gpus 0 == --gpu 0)",
    )
    device.add_argument("--cpu", action="store_true", help="serve on the CPU (queue 'cpu')")
    worker.add_argument("--name", help="worker name (default <gpu-type>-<index>@<host>)")
    worker.add_argument("--loglevel", help="Celery log level (default GPUFLEET_WORKER__LOGLEVEL)")
    worker.set_defaults(func=cmd_worker)

    def add_wait_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--queue", help="send to this queue instead of the routed one")
        sub.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
        sub.add_argument("--json", action="store_true", help="print the full JSON result")

    submit = commands.add_parser("submit", help="enqueue an inference job and print its result")
    kinds = submit.add_subparsers(dest="kind", required=True)
    embed = kinds.add_parser("embed", help="fleet.embed")
    embed.add_argument("model")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--no-normalize", action="store_true")
    generate = kinds.add_parser("generate", help="fleet.generate")
    generate.add_argument("model")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--message", action="append", metavar="ROLE:CONTENT", help="a chat turn; repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", metavar="TEXT", help="end before this text; repeatable")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    for sub in (embed, generate):
        add_wait_options(sub)
        sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.set_defaults(func=cmd_submit)

    load = commands.add_parser("load", help="load a model on a worker (fleet.load_model), with progress")
    load.add_argument("model")
    load.add_argument("--priority", action="store_true", help="pin it: never evicted")
    add_wait_options(load)
    load.set_defaults(func=cmd_load)

    unload = commands.add_parser("unload", help="drop a model from a worker (fleet.unload_model)")
    unload.add_argument("model")
    add_wait_options(unload)
    unload.set_defaults(func=cmd_unload)

    status = commands.add_parser("status", help="the live fleet: each worker's memory, models, job and backlog")
    status.add_argument("--json", action="store_true", help="print the workers' heartbeat records")
    status.add_argument(
        "--control",
        action="store_true",
        help="ask every worker over the broker instead (gpu_status, models_status, cache_status: more detail, slower)",
    )
    status.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the registry (or for replies with --control)"
    )
    status.set_defaults(func=cmd_status)

    plan = commands.add_parser("plan", help="which GPU type can serve a model (no torch needed)")
    plan.add_argument("model", metavar="MODEL_OR_DIR")
    plan.add_argument("--context-length", type=int)
    plan.add_argument("--batch-size", type=int, default=1)
    plan.add_argument("--prefer", choices=("cost", "memory"), default="cost")
    plan.add_argument(
        "--all-types",
        action="store_true",
        help="plan over the whole catalog instead of the fleet's GPUFLEET_FLEET__GPU_TYPES (what the router uses)",
    )
    plan.add_argument("--json", action="store_true", help="print the Placement (and its queue) as JSON")
    plan.add_argument(
        "--live",
        action="store_true",
        help="route MODEL on the live fleet as a job would be, and show the workers the decision saw",
    )
    plan.set_defaults(func=cmd_plan)

    models = commands.add_parser("models", help="local model root tools")
    model_actions = models.add_subparsers(dest="action", required=True)
    make_demo = model_actions.add_parser("make-demo", help="fill ROOT with the demo models")
    make_demo.add_argument("root")
    make_demo.add_argument("--force", action="store_true", help="recreate models that exist")
    listing = model_actions.add_parser("list", help="list the models under ROOT")
    listing.add_argument("root", nargs="?")
    models.set_defaults(func=cmd_models)

    # Listed for the overview only: main() hands everything after "bench" to the benchmark's own parser.
    commands.add_parser("bench", help="loading benchmark (gpufleet bench --help for its options)", add_help=False)

    demo = commands.add_parser("demo", help="start redis + a worker, serve real embed and generate jobs")
    demo.add_argument("--workdir", default=".demo", help="where models, logs and the redis data go")
    demo.add_argument("--gpu", type=int, metavar="N", help="run the worker on GPU N instead of the CPU")
    demo.add_argument("--keep", action="store_true", help="leave redis and the worker running")
    demo.set_defaults(func=cmd_demo)

    api = commands.add_parser("api", help="serve the fleet HTTP API, Prometheus metrics and the dashboard")
    api.add_argument("--host", help="address to listen on (default GPUFLEET_API__HOST, 127.0.0.1)")
    api.add_argument("--port", type=int, help="port to listen on (default GPUFLEET_API__PORT, 8000)")
    api.set_defaults(func=cmd_api)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpufleet`` console script."""
    from gpufleet.gpu.errors import GpuError
    from gpufleet.tasks.errors import FleetError
    from gpufleet.workers.errors import WorkerError

    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if arguments[:1] == ["bench"]:
        # The benchmark parses its own options: an argparse REMAINDER cannot take a leading option (--help).
        command, run = "bench", functools.partial(cmd_bench, arguments[1:])
    else:
        args = parser.parse_args(arguments)
        command, run = args.command, functools.partial(args.func, args)
    try:
        return int(run())
    except (FleetError, GpuError, WorkerError) as exc:
        print(f"gpufleet {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
