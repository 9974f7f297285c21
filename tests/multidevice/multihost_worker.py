"""One process of a multi-process (multi-host) DUET smoke run on CPU, for test_multihost.py.

``python -m tests.multidevice.multihost_worker PROCESS_ID NUM_PROCESSES PORT RUN_DIR CONFIG_JSON``:
parses ``duet-jax run``'s own multi-host flags (``--coordinator-address localhost:PORT
--num-processes N --process-id I``) and joins the ``jax.distributed`` group as ``run.py`` does (each
process with the devices that ``XLA_FLAGS`` gives it), runs the loop into ``RUN_DIR`` (every process
passes its own directory, as on hosts without a shared file system) and prints the summary as JSON
on the last line of stdout.
"""

import argparse
import json
import sys


def main(argv):
    pid, nproc, port, run_dir, cfg_json = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    from duet_jax import run as run_cli

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    args = parser.parse_args(["--coordinator-address", f"localhost:{port}", "--num-processes", str(nproc),
                              "--process-id", str(pid), "--quiet"])
    run_cli._maybe_initialize_distributed(args)
    from duet_jax.config import preset
    from duet_jax.duet import run

    cfg = preset("smoke", **json.loads(cfg_json))
    summary = run(cfg, run_dir, log=lambda s: print(s, flush=True), progress=False)
    print(json.dumps({"process": pid, "summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
