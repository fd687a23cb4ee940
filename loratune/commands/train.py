"""`loratune train`: the run's config from a file, a preset and flags (or the quickstart), then training."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.errors import UserError


def train_command(args, resolve_args) -> int:
    """`resolve_args(args, default_preset)` turns the command line into a resolved config (cli.py)."""
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite starts it over: give one of them")
    if args.resume and (isinstance(args.resume, str) or not args.config):
        run = Path(args.resume if isinstance(args.resume, str) else args.output_dir or "")
        if not (run / "config.yaml").is_file():
            raise UserError(f"--resume {run}: not a run folder (no config.yaml)")
        args.config = args.config or str(run / "config.yaml")
        args.output_dir = str(run)  # --resume RUN_DIR names the run, whatever output_dir a config file gives
    quickstart = not args.config and not args.preset and not args.train_data and not args.data
    config = resolve_args(args, default_preset="quickstart" if quickstart else None).config
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:  # after the check: a bad setting is said once
        return _relaunch(args.num_processes)
    if quickstart:  # after the arguments are checked: a bad one is the only line printed
        print("No config or data given: running the quickstart preset (loratune train --help shows the options).")
        if not (args.output_dir or args.resume or args.overwrite):  # the demo again: keep the earlier run
            config = config.model_copy(update={"output_dir": next_free(Path(config.output_dir))})
    from ..training.plot_process import PlotProcess

    # Before torch: the helper imports the plotting library while this process imports the rest (the main
    # process's; torchrun sets RANK).
    plots = PlotProcess() if os.environ.get("RANK", "0") == "0" else None
    try:
        # Only now: a bad argument or setting is answered without loading torch.
        from ..training.engine import LaunchRefused, launched
        from ..training.loop import train

        try:
            train(config, resume=bool(args.resume), overwrite=args.overwrite, plots=plots)
        except LaunchRefused:
            if launched().rank == 0:
                raise
            return 0  # the launcher's rank 0 says why, once; this process did nothing
    finally:
        if plots:
            plots.close()
    return 0


def next_free(folder: Path) -> str:
    """`folder`, or when it already holds something, the first free `folder-2`, `folder-3`, ..."""
    candidate, n = folder, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    if candidate != folder:
        print(f"{folder} holds an earlier run: this one goes to {candidate}")
    return str(candidate)


def _relaunch(processes: int) -> int:
    """`--num-processes N`: the same command under torchrun (run here, in this process), N data-parallel processes
    (gloo on CPU, NCCL on GPUs). A process that fails has said why; torchrun's own report of it is left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            argv.append(arg)
    # torchrun would give each process one thread; on a CPU they share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "loratune", *argv]))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 128 - min(codes))  # killed by a signal: 128 + its number, as a shell
    return 0
