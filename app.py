"""Command line of the learning chatbot: parse, build the objects, launch.

    python app.py                 # same as `python app.py serve`
    python app.py serve           # chat in the browser at http://127.0.0.1:7860
    python app.py status          # one JSON line: active version and counts
    python app.py export --out feedback.jsonl
    python app.py retrain         # one retrain cycle on the feedback so far, then the gate
    python app.py promote v3      # serve v3 (a running server swaps it in within seconds)
    python app.py rollback        # back to the version active before this one

Every subcommand takes --data-dir (default ./data, or $CHATBOT_DATA_DIR);
those where a model matters take --model (default: the offline starter model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from online_rl import METHODS
from online_rl.gate import GateConfig

DATA_DIR_ENV = "CHATBOT_DATA_DIR"
MODEL_ENV = "CHATBOT_MODEL"
ADMIN_TOKEN_ENV = "CHATBOT_ADMIN_TOKEN"


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV, "data"),
        help=f"where the database, models and adapters live (default ./data, or ${DATA_DIR_ENV})",
    )
    with_model = argparse.ArgumentParser(add_help=False)
    with_model.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, "starter"),
        help="Hugging Face causal LM by hub id or local path, or 'starter' for the built-in "
        f"offline model (default; or ${MODEL_ENV})",
    )
    with_model.add_argument("--device", default="auto",
                            help="auto (default: the first GPU, in bf16 where supported, else the CPU in "
                                 "float32), cpu, cuda or cuda:N")
    with_model.add_argument("--memory-budget-gib", type=float,
                            help="plan against this much memory per device instead of what is free now")
    with_model.add_argument("--no-memory-check", action="store_true",
                            help="skip the memory plan (see docs/deploy.md)")
    with_model.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="none",
                            help="load the base in 8 or 4 bits through bitsandbytes (a GPU and the "
                                 "'quantize' extra); default none")

    parser = argparse.ArgumentParser(
        prog="app.py",
        description="A chatbot that learns from its users' thumbs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common, with_model], help="serve the chat (the default)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--auth", help="require a login on the page and /v1 (HTTP Basic there): "
                                      "user:password[,user:password...]")
    serve.add_argument("--auth-file", help="the same, from a file with one user:password a line")
    serve.add_argument("--api-keys-file", help="require a key or a login on /v1: a file with one user:key a line, "
                                               "keys sent as Authorization: Bearer KEY")
    serve.add_argument("--max-thumbs-per-minute", type=int, default=30,
                       help="thumbs one rater may give in a minute, page and API together; more are refused "
                            "and not stored (default 30; 0: no limit)")
    serve.add_argument("--max-batch", type=int,
                       help="replies written at once in one batch (default: as many as the memory plan fits, "
                            "at most 32 on a GPU and 8 on the CPU)")
    serve.add_argument("--max-waiting", type=int, default=32,
                       help="requests waiting for a row in the batch; more get 503 with Retry-After (default 32)")
    serve.add_argument("--system-prompt", default="", help="default system prompt")
    serve.add_argument("--max-message-chars", type=int, default=8000,
                       help="longer messages and system prompts are refused (default 8000)")
    serve.add_argument("--max-messages", type=int, default=64,
                       help="API requests with more messages are refused; the page sends its newest (default 64)")
    serve.add_argument("--max-total-chars", type=int, default=32000,
                       help="API requests with more characters in all are refused; the page sends its "
                            "newest turns within it (default 32000)")
    ops = serve.add_argument_group("operations")
    ops.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                     help=f"turns on the operator API (/v1/admin) and console (/admin); at least 16 "
                          f"characters (or ${ADMIN_TOKEN_ENV}); without it both are off")
    ops.add_argument("--retrain-every", type=float, default=900, metavar="SECONDS",
                     help="check for new feedback this often and retrain when there is enough "
                          "(default 900; 0 turns the schedule off)")
    ops.add_argument("--retrain-cron", metavar="EXPR",
                     help="check on a crontab schedule instead, in UTC (e.g. '0 3 * * *')")
    ops.add_argument("--min-new-feedback", type=int, default=50,
                     help="feedback rows since the last run needed to start one (default 50)")
    ops.add_argument("--retrain-method", choices=METHODS, default=METHODS[0],
                     help="method of scheduled retrains (default tilt; ppo and kto learn less, see the README)")
    ops.add_argument("--train-device",
                     help="device of the training process (default: the same as --device), e.g. cuda:1")
    ops.add_argument("--train-launcher", choices=["python", "accelerate"], default="python",
                     help="run the training process as one python process (default), or under "
                          "`accelerate launch` (DDP over several GPUs, or CPU processes)")
    ops.add_argument("--train-processes", type=int, default=2,
                     help="with --train-launcher accelerate: how many processes (default 2)")
    ops.add_argument("--accelerate-config", metavar="FILE",
                     help="with --train-launcher accelerate: an accelerate config file (FSDP version 2, "
                          "machines); it decides the processes. See docs/deploy.md")
    ops.add_argument("--train-threads", type=int, default=0,
                     help="torch threads of the training process (default: half the cores)")
    serve.add_argument("--log-json", action="store_true",
                       help="log one JSON object per line on stderr (for a log collector)")
    ops.add_argument("--canary-confidence", type=float, default=0.95,
                     help="live trials (canary, and the watch after a promotion): the confidence of their "
                          "sequential test, held however long a trial runs (default 0.95)")
    ops.add_argument("--canary-margin", type=float, default=0.05,
                     help="live trials: a version at most this much lower in approval counts as not worse "
                          "(default 0.05)")
    ops.add_argument("--no-watch", action="store_true",
                     help="do not watch live approval after a promotion (by default a significant fall "
                          "rolls back by itself)")
    ops.add_argument("--follow-every", type=float, default=2.0, metavar="SECONDS",
                     help="how often to check the registry for a new active version (default 2)")

    sub.add_parser("status", parents=[common], help="print one JSON line: active version and counts")

    export = sub.add_parser("export", parents=[common], help="write feedback as JSON lines for TRL")
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument(
        "--shape",
        choices=["unpaired", "paired"],
        default="unpaired",
        help="unpaired {prompt, completion, label} (default) or paired {prompt, chosen, rejected}",
    )
    retrain = sub.add_parser("retrain", parents=[common, with_model],
                             help="run one retrain cycle now; prints progress, then one JSON summary line")
    retrain.add_argument("--method", choices=METHODS, default=METHODS[0],
                         help="tilt (default): reward models, then the bot's own replies re-weighted by them; "
                              "ppo: reward models, then PPO; kto: KTO straight from the thumbs "
                              "(ppo and kto learn less on the taste suite, see the README)")
    retrain.add_argument("--min-feedback", type=int, default=20,
                         help="refuse (exit 2) with fewer rated replies than this (default 20)")
    retrain.add_argument("--reward-model",
                         help="base of the reward model (hub id or path; default: the policy's base)")
    retrain.add_argument("--ppo-steps", type=int, help="PPO steps (default 30)")
    retrain.add_argument("--threads", type=int, default=0, help="torch threads for training (default: all)")
    retrain.add_argument("--seed", type=int, default=0)
    retrain.add_argument("--no-promote", action="store_true",
                         help="only register the candidate; do not apply the evaluation gate")

    for p in (serve, retrain):
        # The bot's sampling settings: serving uses them as its defaults, and a
        # retrain's rollouts sample with the same ones (what is trained is
        # what is served); the scheduler passes the server's on.
        p.add_argument("--max-new-tokens", type=int, default=96,
                       help="reply length cap in tokens the bot serves with, and retrains sample with (default 96)")
        p.add_argument("--temperature", type=float, default=0.8,
                       help="sampling temperature, served and trained (default 0.8; below 0.01: greedy)")
        p.add_argument("--top-p", type=float, default=0.95,
                       help="nucleus sampling threshold, served and trained (default 0.95)")
        p.add_argument("--no-within-base", action="store_true",
                       help="let adapter versions draw words outside the base's nucleus, served and trained "
                            "(faster: no shadow row on the base beside each reply; docs/serving.md)")
        p.add_argument("--min-win-rate", type=float, default=0.5,
                       help="gate: the candidate's win rate against the active version must be above this "
                            "under its own reward model and, less two standard errors, under the judge (default 0.5)")
        p.add_argument("--canary", type=float, default=0.0, metavar="SHARE",
                       help="a candidate that passes the gate serves this share of new conversations (e.g. 0.1) "
                            "until live thumbs promote or reject it, instead of going live at once "
                            "(default 0: off; see README)")
        p.add_argument("--max-kl", type=float, default=GateConfig.max_kl,
                       help="gate: mean KL to the base at most this many nats per reply token "
                            f"(default {GateConfig.max_kl:g})")

    sub.add_parser("promote", parents=[common],
                   help="make VERSION the active one (v0: the base model) once its adapter passes its check") \
        .add_argument("version", help="v0, v1, v2, ...")
    rollback = sub.add_parser("rollback", parents=[common],
                              help="go back to the version active before the current one (checked the same way)")
    rollback.add_argument("--to", help="go back to this version instead")
    return parser


def open_store(data_dir: str):
    from storage import Store

    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise CliError(f"--data-dir {data_dir!r} is a file, not a directory")
    try:
        os.makedirs(data_dir, exist_ok=True)
        return Store.in_data_dir(data_dir)
    except PermissionError as exc:
        raise CliError(f"cannot write to data directory {data_dir!r}: {exc.strerror}") from None
    except Exception as exc:  # sqlite3.DatabaseError and friends
        raise CliError(f"cannot open the database in {data_dir!r}: {exc}") from None


def cmd_status(args) -> int:
    store = open_store(args.data_dir)
    print(json.dumps(store.status(), sort_keys=True))
    return 0


def cmd_export(args) -> int:
    store = open_store(args.data_dir)
    n = store.export_jsonl(args.out, shape=args.shape)
    print(json.dumps({"out": args.out, "shape": args.shape, "rows": n}))
    return 0


def cmd_promote(args) -> int:
    from chatbot import promotion
    from chatbot.adapters import AdapterLoadError
    from storage import StoreError

    store = open_store(args.data_dir)
    try:
        result = promotion.promote(store, args.version, promotion.on_disk(args.data_dir), actor="command line",
                                   reason="promoted from the command line")
    except (StoreError, AdapterLoadError) as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result))
    return 0


def cmd_rollback(args) -> int:
    from chatbot import promotion
    from chatbot.adapters import AdapterLoadError
    from storage import StoreError

    store = open_store(args.data_dir)
    try:
        result = promotion.rollback(store, args.to, promotion.on_disk(args.data_dir), actor="command line")
    except (StoreError, AdapterLoadError) as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result))
    return 0


def retrain_command(args):
    """The training process a scheduled retrain runs: this file's `retrain`."""
    app = os.path.abspath(__file__)

    device = args.train_device or args.device

    def command(method: str, threads: int) -> list[str]:
        retrain = [app, "retrain", "--data-dir", os.path.abspath(args.data_dir),
                   "--model", args.model, "--device", device, "--quantize", args.quantize, "--method", method,
                   "--threads", str(threads), "--min-win-rate", str(args.min_win_rate),
                   "--max-kl", str(args.max_kl), "--canary", str(args.canary),
                   "--max-new-tokens", str(args.max_new_tokens),
                   "--temperature", str(args.temperature), "--top-p", str(args.top_p),
                   *(["--no-within-base"] if args.no_within_base else [])]
        if args.train_launcher == "python":
            return [sys.executable, *retrain]
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if args.accelerate_config:
            launch += ["--config_file", args.accelerate_config]
        else:
            launch += ["--num_processes", str(args.train_processes)]
            # torchrun's launcher for several processes, GPUs or CPU processes
            # (accelerate's --cpu flag would start only one); the cycle joins
            # a gloo group on the CPU.
            launch += ["--multi_gpu"] if args.train_processes > 1 else []
        return [*launch, *retrain]

    return command


def training_layout(args) -> tuple[int, bool]:
    """How many processes a retrain runs as, and whether FSDP shards it: from
    the launcher's environment inside `retrain`, from the scheduler's
    settings (and the accelerate config file) in `serve`."""
    from online_rl.distributed import training_engine

    if "WORLD_SIZE" in os.environ:  # this is one process of `accelerate launch`
        try:
            sharded = training_engine() == "fsdp2"
        except ValueError:  # an engine the cycle refuses, as a failed run with the reason
            sharded = False
        return int(os.environ["WORLD_SIZE"]), sharded
    if getattr(args, "train_launcher", "python") != "accelerate":
        return 1, False
    if not args.accelerate_config:
        return args.train_processes, False
    try:
        import yaml

        with open(args.accelerate_config, encoding="utf-8") as fp:
            launch = yaml.safe_load(fp) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read the accelerate config {args.accelerate_config}: {exc}", code=2) from None
    fsdp = launch.get("distributed_type") == "FSDP" and str(
        (launch.get("fsdp_config") or {}).get("fsdp_version", 1)) == "2"
    return int(launch.get("num_processes") or 1), fsdp


def check_memory(args, *, serve: bool, train: bool, progress=None) -> tuple[str | None, int]:
    """Refuse to start (exit 2) when the memory plan does not fit; see chatbot/memory.py.

    Returns a note when the plan could not be made (the model's config is not
    readable here; logged once the model has loaded, since a model that does
    not load has a clearer error of its own), and the serving batch's rows:
    --max-batch when it fits, else as many as fit (at most a cap per device)."""
    requested = getattr(args, "max_batch", None)
    if args.no_memory_check:
        return None, requested or _default_batch(args)
    import logging

    from chatbot import memory
    from chatbot.models import ModelLoadError, resolve_device, resolve_model_path
    from online_rl.ppo import PPOConfig

    processes, sharded = training_layout(args) if train else (1, False)
    try:
        serve_device = resolve_device(args.device) if serve else None
        train_device = resolve_device(getattr(args, "train_device", None) or args.device) if train else None
        if train_device is not None and train_device.type == "cuda" and "LOCAL_RANK" in os.environ:
            train_device = resolve_device(f"cuda:{os.environ['LOCAL_RANK']}")  # this process's GPU
        path = resolve_model_path(args.model, args.data_dir, build_progress=progress)
        plans = memory.plan(path, serve_device=serve_device, train_device=train_device, quantize=args.quantize,
                            reward_model_path=getattr(args, "reward_model", None), ppo=PPOConfig(),
                            new_tokens=getattr(args, "max_new_tokens", 96),
                            processes=processes, sharded=sharded)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a config that cannot be read here fails clearly at load
        return f"memory plan skipped: cannot read the model's config ({exc})", requested or _default_batch(args)
    available = memory.budget(args.memory_budget_gib)
    batch = 0
    try:
        if serve:  # one row first: the model itself must fit
            memory.check(plans, available=available, hints=memory.HINTS)
            batch = memory.serving_batch(plans, requested, available=available)
            plans = [memory.with_batch(p, batch) for p in plans]
        report = memory.check(plans, available=available, hints=memory.HINTS)
    except memory.MemoryPlanError as exc:
        raise CliError(f"memory plan: {exc}", code=2) from None
    for plan in plans:
        logging.getLogger("chatbot").info("memory plan: %s on %s needs %s", plan.name, plan.device, plan.describe())
    logging.getLogger("chatbot").info("memory plan fits: %s", report)
    return None, batch


def _default_batch(args) -> int:
    """The batch's rows when no memory plan says: the cap for the device."""
    from chatbot import memory
    from chatbot.models import resolve_device

    return memory.AUTO_BATCH[resolve_device(args.device).type == "cuda"]


def serve_settings(args):
    """The server's settings and the chat's options from the flags; a
    `CliError` (exit 2) that names the flag when one is out of range."""
    from chatbot.models import GenerationSettings
    from chatbot.live_trials import TrialSettings
    from online_rl.gate import check_canary_share
    from chatbot.server import ServeSettings
    from chatbot.ui import ChatOptions

    try:
        defaults = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, system_prompt=args.system_prompt,
                                      within_base=not args.no_within_base)
        options = ChatOptions(defaults=defaults, max_message_chars=args.max_message_chars,
                              max_new_tokens_limit=max(args.max_new_tokens, 1024), max_messages=args.max_messages,
                              max_total_chars=args.max_total_chars,
                              max_thumbs_per_minute=args.max_thumbs_per_minute).validate()
        settings = ServeSettings(host=args.host, port=args.port, admin_token=args.admin_token,
                                 follow_every=args.follow_every,
                                 max_batch=1 if args.max_batch is None else args.max_batch,
                                 max_waiting=args.max_waiting,
                                 trials=TrialSettings(confidence=args.canary_confidence, margin=args.canary_margin,
                                                      watch=not args.no_watch)).validate()
        check_canary_share(args.canary)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    return settings, options


def cmd_serve(args) -> int:
    from chatbot import credentials
    from chatbot.admin import check_token
    from chatbot.cpu import own_thread
    from chatbot.models import ModelLoadError, load_model
    from online_rl.scheduler import RetrainScheduler, ScheduleConfig

    from chatbot.browser_secret import browser_secret

    store = open_store(args.data_dir)
    settings, options = serve_settings(args)
    try:
        page_secret = browser_secret(args.data_dir)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc), code=2) from None
    try:
        args.admin_token = check_token(args.admin_token)
        logins_and_keys = credentials.load(args.auth, args.auth_file, args.api_keys_file)
        schedule = ScheduleConfig(every_s=args.retrain_every, cron=args.retrain_cron,
                                  min_new_feedback=args.min_new_feedback, method=args.retrain_method,
                                  threads=args.train_threads).validate()
        if args.retrain_method != "ppo" and training_layout(args)[0] > 1:
            raise ValueError(f"several training processes run PPO only: add --retrain-method ppo, or train "
                             f"{args.retrain_method} in one process (--train-launcher python)")
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    scheduler = RetrainScheduler(store, retrain_command(args), schedule,
                                 log_dir=os.path.join(args.data_dir, "logs"))
    import logging

    from chatbot import logs
    from chatbot.metrics import loading_app
    from chatbot.server import BackgroundServer, serve

    logs.configure(json_lines=args.log_json)
    log = logging.getLogger("chatbot")
    # While the model loads (minutes for a first starter build, longer for a
    # big model), the port already answers: /healthz says 503 "loading".
    state = {"message": f"loading model {args.model!r}"}

    def progress(line: str) -> None:
        state["message"] = line
        log.info(line)

    try:
        loading = BackgroundServer(loading_app(state), host=args.host, port=args.port).__enter__()
    except (OSError, RuntimeError) as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    try:
        skipped, settings.max_batch = check_memory(args, serve=True, train=schedule.enabled, progress=progress)
        # on a thread of its own, so that the engine's is the one OpenMP pool left (chatbot.cpu)
        loaded = own_thread(load_model, args.model, args.data_dir, device=args.device, build_progress=progress,
                            quantize=args.quantize)
        if skipped:
            log.warning(skipped)
    except (ModelLoadError, CliError) as exc:
        loading.__exit__(None, None, None)
        raise CliError(str(exc), code=getattr(exc, "code", 1)) from None
    log.info("model %r loaded from %s on %s (%s)", loaded.name, loaded.path, loaded.device, loaded.dtype)
    # The loading answerer gives the port up only when the app is built.
    settings.admin_token = args.admin_token
    serve(settings, options, store, loaded, scheduler, page_secret=page_secret, credentials=logins_and_keys,
          before_listen=lambda: loading.__exit__(None, None, None))
    return 0


def cmd_retrain(args) -> int:
    from online_rl.cycle import CycleConfig, CycleFailed, NotEnoughFeedback, run_cycle, summary_line
    from storage import RunInProgress

    from chatbot.models import GenerationSettings

    store = open_store(args.data_dir)
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, within_base=not args.no_within_base)
    config = CycleConfig(method=args.method, min_feedback=args.min_feedback, device=args.device,
                         reward_model=args.reward_model, threads=args.threads, seed=args.seed,
                         promote=not args.no_promote, quantize=args.quantize, generation=generation,
                         canary=args.canary)
    config.gate.min_win_rate = config.gate.min_judge_win_rate = args.min_win_rate
    config.gate.max_kl = args.max_kl
    if args.ppo_steps is not None:
        config.ppo.steps = args.ppo_steps
    try:
        config.validate()
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    skipped, _ = check_memory(args, serve=False, train=True)
    if skipped:
        print(f"warning: {skipped}", file=sys.stderr)
    try:
        result = run_cycle(store, data_dir=args.data_dir, model_name=args.model, config=config,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    except NotEnoughFeedback as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"status": "refused", "run_id": store.runs(1)[0]["id"], "error": str(exc)}))
        return 2
    except RunInProgress as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"status": "refused", "run_id": None, "error": str(exc)}))
        return 2
    except CycleFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"status": "failed", "run_id": store.runs(1)[0]["id"], "error": str(exc)}))
        return 1
    if result.get("status") == "worker":  # another process of `accelerate launch` reports
        return 0
    print(json.dumps(summary_line(result), default=str))
    return 0


COMMANDS = {"serve": cmd_serve, "status": cmd_status, "export": cmd_export, "retrain": cmd_retrain,
            "promote": cmd_promote, "rollback": cmd_rollback}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
