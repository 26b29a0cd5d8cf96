"""`python run.py sweep`: run presets x seeds, one child `run.py` process at a time per GPU.

    python run.py sweep --presets kvasir_gazesup kvasir_full_sup --seeds 0,1,2 --root data/kvasir --exp_path EXP
    python run.py sweep --presets 'kvasir_*' --seeds 0,1,2 --root data/kvasir --exp_path EXP --gpus 0,1,2,3
    python run.py sweep ... -- --num_worker 8 --amp bf16     # flags after `--` go to every new run

A run is identified by (dataset, run_name, seed) and its settings (common.identity.run_identity): its folder
EXP/<seed>/<data>/<run_name>_<timestamp>/; a folder of the same name with other settings is another experiment.
A run whose metrics.json reached max_ite is skipped; an interrupted one (model_latest.pth, no metrics.json) is
resumed in its folder with `run.py --resume --ckpt_path RUN` (plus --root, and --device 0 under --gpus);
otherwise a new run starts. Each child's output
goes to EXP/sweep_logs/<data>/<run_name>_seed<seed>.log. A failed child is reported and the others go on.
Ctrl-C / SIGTERM: the running children get one SIGTERM (they save model_latest.pth and stop), no new child
starts; running the same command again continues.

`--launcher slurm` submits the same runs as one Slurm job array instead (experiments/slurm.py), and
`--status EXP` shows each run of EXP as pending / running / finished / failed.
"""
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import INTERRUPTED_EXIT, OneLineParser, UserError, UserErrors, command_name
from common.files import write_text_atomic
from common.identity import identity_differences
from experiments.presets import read_preset, resolve_presets
from experiments.summarize import Run, read_run
from parse_args import SWEEP_OWNED, flags_with

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
OWNED_FLAGS = {f"--{name}" for name in flags_with(SWEEP_OWNED)}  # they identify a run


@dataclass
class Job:
    """One run of the sweep: a preset at a seed."""
    preset: Path
    run_name: str
    data: str        # the run folder's <data> component (the dataset spec's name)
    seed: int
    root: str | None
    identity: dict | None = None  # common.identity.run_identity of the run this job would start

    @property
    def label(self) -> str:
        return f"{self.data}/{self.run_name} seed {self.seed}"


@dataclass
class Outcome:
    job: Job
    action: str      # skip | start | resume
    status: str      # finished | failed (rc N) | interrupted | planned
    run_dir: Path | None = None
    log: Path | None = None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: expected distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def _roots(items: list[str]) -> dict[str | None, str]:
    """`--root PATH` (every dataset) and/or `--root NAME=PATH` (the presets of dataset NAME)."""
    roots: dict[str | None, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        key, value = (name, path) if sep and name and "/" not in name else (None, item)
        if key in roots:
            raise UserError(f"--root given twice for {key or 'every dataset'}: {roots[key]} and {value}")
        roots[key] = value
    return roots


def make_jobs(presets: list[Path], seeds: list[int], roots: dict[str | None, str]) -> list[Job]:
    """Every preset at every seed, seed-major (a first complete table after the first seed)."""
    from common.dataspec import load_spec

    specs: list[tuple[Path, str, str]] = []
    names = {}
    for path in presets:
        values = read_preset(path)
        data = load_spec(values.get("data", "kvasir")).name
        key = (data, values["run_name"])
        if key in names:
            raise UserError(f"presets {names[key]} and {path} share run_name {key[1]!r} on {data}: runs of one "
                            f"would count as the other's")
        names[key] = path
        specs.append((path, values["run_name"], data))
    jobs = []
    for seed in seeds:
        for path, name, data in specs:
            jobs.append(Job(path, name, data, seed, roots.get(data, roots.get(None))))
    return jobs


def child_settings(exp: Path, job: Job, extra: list[str]):
    """The settings the job's run would record, parsed exactly as run.py parses its command line (a preset key
    or flag after `--` that run.py refuses is a FlagError here, before anything starts)."""
    from parse_args import parse_with_explicit
    argv = command(exp, job, "start", None, extra)[2:]
    return parse_with_explicit(argv)[0]


def root_problem(root: str | None, settings) -> str:
    """Why ROOT is not the prepared layout this run needs ('' when it is)."""
    if root is None:
        return "no --root"
    path = Path(root)
    if not path.is_dir():
        return f"--root {root} is not a folder"
    need = ["images", f"{settings.train_split}.txt", f"{settings.test_split}.txt"]
    need.append(f"gaze/{settings.gaze_dir}" if settings.method == "gaze_sup" else "masks")
    missing = [n for n in need if not (path / n).exists()]
    return f"--root {root} lacks {', '.join(missing)} (prepare it first: python -m prepare)" if missing else ""


def preflight(exp: Path, jobs: list[Job], roots: dict, extra: list[str]) -> None:
    """Every run's preset, flags and root checked before the first child starts: one line per problem.
    Sets each job's identity."""
    from common.dataspec import load_spec, spec_record
    from common.identity import run_identity
    from parse_args import RESULT_NEUTRAL, default_settings

    problems: list[str] = []
    datasets = {j.data for j in jobs}
    problems += [f"--root {name}={roots[name]}: no preset of this sweep is on dataset {name!r} (they are on "
                 f"{', '.join(sorted(datasets))})" for name in roots if name is not None and name not in datasets]
    checked: dict[tuple, str] = {}
    refused: set = set()
    for job in jobs:
        try:
            settings = child_settings(exp, job, extra)
        except UserError as e:
            if job.preset not in refused:  # once per preset, not once per seed
                refused.add(job.preset)
                problems.append(f"{job.data}/{job.run_name} ({job.preset}): {e}")
            continue
        job.identity = run_identity(vars(settings), spec_record(load_spec(settings.data)), default_settings(),
                                    RESULT_NEUTRAL)
        key = (settings.root, settings.method, settings.gaze_dir, settings.train_split, settings.test_split)
        if key not in checked:
            checked[key] = root_problem(settings.root, settings)
            if checked[key]:
                problems.append(f"{job.data}/{job.run_name}: {checked[key]}")
    if problems:
        raise UserErrors(problems)


def check_gpus(gpus: list[str]) -> None:
    """Every --gpus index names a GPU this machine shows (else every child would train on the CPU at once)."""
    bad = [g for g in gpus if not g.isdigit()]
    if bad:
        raise UserError(f"--gpus {','.join(gpus)}: {bad[0]!r} is not a GPU index; expected e.g. 0,1")
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    allowed = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else \
        [str(i) for i in range(count)]
    if count == 0:
        allowed = []
    missing = [g for g in gpus if g not in allowed]
    if missing:
        shown = ", ".join(allowed) if allowed else "none"
        raise UserError(f"--gpus {','.join(gpus)}: GPU {', '.join(missing)} is not visible (visible: {shown}); "
                        "leave --gpus out to run one run at a time on the CPU")


def existing_runs(exp: Path, job: Job, same_settings: bool = True) -> list[Run]:
    """The job's run folders in EXP (same data, run_name and seed, and the same settings unless
    `same_settings` is False; --test folders excluded), oldest first."""
    base = exp / str(job.seed) / job.data
    if not base.is_dir():
        return []
    runs = [read_run(p) for p in sorted(base.iterdir()) if (p / "config.yaml").is_file()]
    return [r for r in runs if r.run_name == job.run_name and r.seed == job.seed and r.status != "evaluation"
            and (not same_settings or job.identity is None or r.identity == job.identity)]


def other_settings(exp: Path, job: Job) -> list[str]:
    """One line per run folder of the job's name and seed whose settings differ (it is another experiment)."""
    if job.identity is None:
        return []
    return [f"{job.label}: {run.path} has the same name but other settings ("
            + "; ".join(identity_differences(run.identity, job.identity)[:6]) + "): not this run"
            for run in existing_runs(exp, job, same_settings=False) if run.identity != job.identity]


def plan(exp: Path, job: Job) -> tuple[str, Path | None]:
    """skip (a finished run of the same settings exists), resume (the newest unfinished one with
    model_latest.pth) or start. A run of the same name and seed with other settings is another experiment."""
    runs = existing_runs(exp, job)
    for run in runs:
        if run.status == "finished":
            return "skip", run.path
    for run in reversed(runs):
        if run.status == "unfinished" and (run.path / "model_latest.pth").is_file():
            return "resume", run.path
    return "start", None


def command(exp: Path, job: Job, action: str, run_dir: Path | None, extra: list[str],
            on_gpu: bool = False) -> list[str]:
    """The child's command line: a new run from the preset, or a resume of `run_dir` in place.

    Args:
        on_gpu: the child sees one GPU (CUDA_VISIBLE_DEVICES), so it is told `--device 0`.
    """
    # a resumed run's config.yaml and checkpoint are the truth; only the data folder and device may change
    cmd = [sys.executable, str(RUN_PY)] + (["--resume", "--ckpt_path", str(run_dir)] if action == "resume" else [
        "--config", str(job.preset), "--seed", str(job.seed), "--exp_path", str(exp), "--quiet"])
    if job.root:
        cmd += ["--root", job.root]
    if on_gpu:
        cmd += ["--device", "0"]
    return cmd + (list(extra) if action == "start" else [])


class Sweep:
    """Runs jobs from a queue, one worker thread (and one child at a time) per GPU slot."""

    def __init__(self, exp: Path, jobs: list[Job], extra: list[str], gpus: list[str] | None):
        self.exp, self.extra, self.gpus = exp, extra, gpus
        self.todo: queue.Queue[Job] = queue.Queue()
        for job in jobs:
            self.todo.put(job)
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.children: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"{time.strftime('%H:%M:%S')} sweep: {text}", flush=True)

    def log_path(self, job: Job) -> Path:
        path = self.exp / "sweep_logs" / job.data / f"{job.run_name}_seed{job.seed}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def run_job(self, job: Job, gpu: str | None) -> Outcome:
        for line in other_settings(self.exp, job):
            self.say(line)
        action, run_dir = plan(self.exp, job)
        if action == "skip":
            self.say(f"{job.label}: finished in {run_dir}, skipped")
            return Outcome(job, action, "finished", run_dir)
        cmd = command(self.exp, job, action, run_dir, self.extra, gpu is not None)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = self.log_path(job)
        where = f" on GPU {gpu}" if gpu is not None else ""
        self.say(f"{job.label}: {'resuming ' + str(run_dir) if action == 'resume' else 'starting'}{where}, log {log}")
        with open(log, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {action}{where}: {' '.join(cmd)}\n")
            f.flush()
            # own session: a terminal's Ctrl-C reaches the sweep only, which sends each child one SIGTERM
            child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            f.write(f"=== pid {child.pid}\n")
            f.flush()
            with self.lock:
                self.children[child.pid] = child
            if self.stop.is_set():  # a signal arrived while this child started
                child.send_signal(signal.SIGTERM)
            rc = child.wait()
            with self.lock:
                self.children.pop(child.pid, None)
            f.write(f"=== exit status {rc}\n")
        after = [r for r in existing_runs(self.exp, job) if r.status == "finished"]
        if rc == 0 and after:
            status = "finished"
        elif self.stop.is_set() and rc in (INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT):
            status = "interrupted"
        else:
            status = f"failed (exit {rc})" if rc != 0 else "failed (exit 0 but no finished metrics.json)"
        run_dir = after[-1].path if after else (run_dir or self._newest(job))
        self.say(f"{job.label}: {status}" + ("" if status == "finished" else f"; see {log}"))
        return Outcome(job, action, status, run_dir, log)

    def _newest(self, job: Job) -> Path | None:
        runs = existing_runs(self.exp, job)
        return runs[-1].path if runs else None

    def worker(self, gpu: str | None) -> None:
        while not self.stop.is_set():
            try:
                job = self.todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = self.run_job(job, gpu)
            except Exception as e:  # noqa: BLE001  (a broken job must not stop the others)
                outcome = Outcome(job, "start", f"failed ({type(e).__name__}: {e})")
                self.say(f"{job.label}: {outcome.status}")
            with self.lock:
                self.outcomes.append(outcome)

    def on_signal(self, signum, frame) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        with self.lock:
            children = list(self.children.values())
        print(f"sweep: {signal.Signals(signum).name}: " + ("asking the running runs to save and stop; no new run "
              "starts (run the same command again to continue)" if first else "passing it on"), flush=True)
        for child in children:
            child.send_signal(signal.SIGTERM)

    def run(self) -> list[Outcome]:
        slots = self.gpus or [None]
        threads = [threading.Thread(target=self.worker, args=(g,), daemon=True) for g in slots]
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self.on_signal)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # short joins keep the main thread free to handle signals
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.outcomes


class SweepLock:
    """EXP/.sweep.lock: one sweep per EXP at a time (two would resume the same run twice). A lock left by a
    sweep that no longer runs on this machine is taken over."""

    def __init__(self, exp: Path):
        self.path = exp / ".sweep.lock"
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def held_by_other(self) -> str | None:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return f"{host} (pid {pid})"
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None  # stale: that sweep is gone
        except (PermissionError, ValueError):
            pass
        return None if int(pid) == os.getpid() else f"pid {pid}"

    def __enter__(self):
        other = self.held_by_other()
        if other:
            raise UserError(f"another sweep ({other}) is running in {self.path.parent}; wait for it, or delete "
                            f"{self.path} if it is gone")
        write_text_atomic(self.path, self.me)
        return self

    def __exit__(self, *exc):
        try:
            if self.path.read_text() == self.me:
                self.path.unlink()
        except OSError:
            pass


def report(outcomes: list[Outcome], jobs: list[Job]) -> str:
    done = {(o.job.data, o.job.run_name, o.job.seed): o for o in outcomes}
    lines = [f"{'run':<48} {'action':<7} {'status':<22} folder / log"]
    for job in jobs:
        o = done.get((job.data, job.run_name, job.seed))
        if o is None:
            lines.append(f"{job.label:<48} {'-':<7} {'not started':<22}")
            continue
        where = o.run_dir if o.status == "finished" else (o.log or o.run_dir or "")
        lines.append(f"{job.label:<48} {o.action:<7} {o.status:<22} {where}")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=command_name("run.py sweep"),
                      description="Run presets x seeds: finished runs are skipped, interrupted "
                "ones resumed in their folder. Flags after `--` are passed to every new run.")
    p.add_argument("--presets", nargs="+", default=None,
                   help="preset names in configs/presets/ (shell patterns such as 'kvasir_*' allowed) or YAML files")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--root", action="append", default=[],
                   help="dataset folder for every preset, or NAME=PATH for the presets of dataset NAME (repeatable)")
    p.add_argument("--exp_path", default="exp", help="where the runs (and sweep_logs/) go")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices: one run at a time on each "
                   "(CUDA_VISIBLE_DEVICES); default: one run at a time on what the child sees")
    p.add_argument("--dry_run", action="store_true", help="print what would be skipped, resumed or started (with "
                   "--launcher slurm: submitted, and the sbatch script)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local", help="local: child processes on this "
                   "machine (default); slurm: one Slurm job array through submitit")
    p.add_argument("--status", metavar="EXP", default=None, help="show each run of EXP as pending / running / "
                   "finished / failed (with its Slurm job id) and exit")
    p.add_argument("--wait", action="store_true", help="--launcher slurm: wait until the submitted runs have ended")
    from experiments.slurm import add_arguments
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every run finished, 1 when one failed, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.status is not None:
        from experiments.slurm import status_rows, status_table
        if not Path(args.status).is_dir():
            raise UserError(f"--status {args.status}: not a folder (expected a sweep's --exp_path)")
        print(status_table(status_rows(Path(args.status))))
        return 0
    if not args.presets:
        raise UserError("run.py sweep: the following arguments are required: --presets (see run.py sweep --help)")
    exp = Path(args.exp_path)
    seeds, roots = _seeds(args.seeds), _roots(args.root)
    jobs = make_jobs(resolve_presets(args.presets), seeds, roots)
    missing = sorted({j.data for j in jobs if j.root is None})
    if missing and "--root" not in extra:
        raise UserError(f"--root is missing for {', '.join(missing)}: give --root PATH or --root NAME=PATH")
    owned = sorted({a.partition("=")[0] for a in extra  # either spelling, with or without =VALUE
                    if a.startswith("--") and "--" + a.partition("=")[0][2:].replace("-", "_") in OWNED_FLAGS})
    if owned:
        raise UserError(f"flags after `--` must not set {', '.join(owned)}: the sweep sets them (they identify a run)")
    slurm_only = [f for f in ("max_parallel", "wait") if getattr(args, f)] + [
        f for f in ("slurm_partition", "slurm_gpus_per_task", "slurm_cpus_per_task", "slurm_mem", "slurm_account",
                    "slurm_qos", "sbatch") if getattr(args, f)]
    if args.launcher == "slurm":
        if args.gpus:
            raise UserError("--gpus is for --launcher local; with --launcher slurm ask for GPUs with "
                            "--slurm_gpus_per_task")
        from experiments.slurm import main as slurm_main
        return slurm_main(exp, jobs, extra, args, roots)
    if slurm_only:
        raise UserError(f"--{slurm_only[0]} is for --launcher slurm (this sweep runs locally)")
    gpus = [g for g in args.gpus.replace(" ", "").split(",") if g] if args.gpus else None
    if gpus:
        check_gpus(gpus)
    preflight(exp, jobs, roots, extra)
    if args.dry_run:
        for job in jobs:
            for line in other_settings(exp, job):
                print(line)
            action, run_dir = plan(exp, job)
            shown = run_dir if action == "skip" else " ".join(command(exp, job, action, run_dir, extra, bool(gpus)))
            print(f"{job.label}: {action} {shown}")
        return 0
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --exp_path {exp}: {e}") from None
    sweep = Sweep(exp, jobs, extra, gpus)
    with SweepLock(exp):
        from experiments.slurm import active_runs
        held = active_runs(exp)
        if held:  # the lock holds across launchers: never two copies of one run
            jid, state = next(iter(held.values()))
            raise UserError(f"{len(held)} runs of {exp} are still {state} in Slurm (job {jid.split('_')[0]}); wait "
                            f"for them (run.py sweep --status {exp}) or scancel them before a local sweep")
        print(f"sweep: {len(jobs)} runs ({len(jobs) // len(seeds)} presets x {len(seeds)} seeds) in {exp}"
              + (f" on GPUs {','.join(gpus)}" if gpus else ""), flush=True)
        outcomes = sweep.run()
    print(report(outcomes, jobs), flush=True)
    if sweep.stop.is_set():
        return INTERRUPTED_EXIT
    return 0 if all(o.status == "finished" for o in outcomes) and len(outcomes) == len(jobs) else 1


if __name__ == "__main__":
    from common.errors import run_cli
    raise SystemExit(run_cli(main))
