"""`run.py sweep --launcher slurm`: the sweep's runs as one Slurm job array, submitted through submitit.

    python run.py sweep --presets 'kvasir_*' --seeds 0,1,2 --root ROOT --exp_path EXP --launcher slurm \\
        --slurm_partition gpu --slurm_time 2:00:00 --slurm_gpus_per_task 1 --slurm_cpus_per_task 8 --max_parallel 8
    python run.py sweep --status EXP        # pending / running / finished / failed, with the Slurm job ids

The runs are the local sweep's (`sweep.make_jobs`, `sweep.plan`, `sweep.command`): a finished run is skipped, an
interrupted one resumed in its folder, a new one started. The plan is made again inside each Slurm task when it
starts, so a task that Slurm requeues (after a timeout or a preemption) resumes its run from model_latest.pth.
Runs whose task is still pending or running in Slurm are left alone; everything else not finished is submitted,
one array task per run, at most --max_parallel at once. EXP/sweep_logs/slurm_jobs.json records which Slurm job
ran which run (for `--status`), EXP/sweep_logs/slurm/ holds submitit's scripts and logs, and each run's own
output is appended to EXP/sweep_logs/<data>/<run_name>_seed<seed>.log as with the local launcher.

Signals: submitit asks Slurm for SIGUSR2 `signal_delay_s` before the time limit; the task then sends its run one
SIGTERM (run.py saves model_latest.pth and stops), and submitit requeues the task. `scancel` (and a preemption)
sends SIGTERM to every process of the job: run.py saves and stops, and the next `sweep` resumes it.
"""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.files import write_text_atomic
from experiments.summarize import read_run
from experiments.sweep import Job, SweepLock, command, existing_runs, other_settings, plan, preflight

REPO = Path(__file__).resolve().parents[1]
RECORD = Path("sweep_logs") / "slurm_jobs.json"
MAX_TIMEOUTS = 20
SIGNAL_DELAY_S = 120        # SIGUSR2 this long before the time limit: time to finish an iteration and save
ACTIVE = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending", "RUNNING": "running", "COMPLETING": "running",
          "SUSPENDED": "running", "STOPPED": "running", "SIGNALING": "running", "STAGE_OUT": "running",
          "RESIZING": "running"}


class SlurmError(UserError):
    """Slurm is missing, or refuses the sweep's resources."""


@dataclass
class SlurmSettings:
    """The sbatch resources of every task (flags that map one to one onto sbatch's own options)."""
    partition: str | None = None
    time: str = "2:00:00"
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: dict[str, str | bool] = field(default_factory=dict)   # other #SBATCH options: name -> value or True
    max_parallel: int | None = None

    def options(self) -> list[str]:
        """The sbatch command-line options (for `sbatch --test-only`)."""
        named = {"partition": self.partition, "time": self.time, "gpus-per-task": self.gpus_per_task,
                 "cpus-per-task": self.cpus_per_task, "mem": self.mem, "account": self.account, "qos": self.qos}
        named.update(self.sbatch)
        return [f"--{k}" if v is True else f"--{k}={v}" for k, v in named.items() if v is not None]


def add_arguments(p) -> None:
    """The Slurm flags of `run.py sweep`."""
    g = p.add_argument_group("--launcher slurm (sbatch resources of each run; see docs/how-to/slurm.md)")
    g.add_argument("--max_parallel", metavar="K", type=int, default=None,
                   help="at most K runs at once (the array's %%K); default: as many as Slurm allows")
    g.add_argument("--slurm_partition", metavar="P", default=None, help="sbatch --partition (default: the cluster's)")
    g.add_argument("--slurm_time", metavar="T", default="2:00:00", help="sbatch --time of each task, e.g. 90, 2:00:00, "
                   "1-00:00:00; a run that reaches it is requeued and resumes (default 2:00:00)")
    g.add_argument("--slurm_gpus_per_task", metavar="N", type=int, default=None, help="sbatch --gpus-per-task")
    g.add_argument("--slurm_cpus_per_task", metavar="N", type=int, default=None, help="sbatch --cpus-per-task")
    g.add_argument("--slurm_mem", metavar="M", default=None, help="sbatch --mem, e.g. 32G")
    g.add_argument("--slurm_account", metavar="A", default=None, help="sbatch --account")
    g.add_argument("--slurm_qos", metavar="Q", default=None, help="sbatch --qos")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION[=VALUE]",
                   help="any other #SBATCH option, e.g. --sbatch constraint=a100 --sbatch exclusive (repeatable)")


def settings_from(args) -> SlurmSettings:
    extra: dict[str, str | bool] = {}
    for item in args.sbatch:
        name, sep, value = item.lstrip("-").partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise SlurmError(f"--sbatch {item!r}: expected an sbatch option name and value, e.g. constraint=a100")
        if name in {"array", "output", "error", "signal", "open-mode", "job-name"}:
            raise SlurmError(f"--sbatch {item!r}: the sweep sets --{name} itself")
        extra[name] = value if sep else True
    for flag in ("max_parallel", "slurm_gpus_per_task", "slurm_cpus_per_task"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "slurm_gpus_per_task" else 1):
            raise SlurmError(f"--{flag} {value}: expected a positive integer")
    return SlurmSettings(args.slurm_partition, args.slurm_time, args.slurm_gpus_per_task, args.slurm_cpus_per_task,
                         args.slurm_mem, args.slurm_account, args.slurm_qos, extra, args.max_parallel)


def time_minutes(text: str) -> int:
    """Slurm's time formats (minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]])
    in whole minutes, rounded up (submitit counts timeouts in minutes)."""
    t = text.strip()
    if t.upper() in ("INFINITE", "UNLIMITED"):
        return 365 * 24 * 60
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise SlurmError(f"--slurm_time {text!r}: expected a Slurm time such as 90, 2:00:00 or 1-00:00:00")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1):                      # days-hours[:minutes[:seconds]]
        seconds = days * 86400 + a * 3600 + b * 60 + c
    elif m.group(4):                    # hours:minutes:seconds
        seconds = a * 3600 + b * 60 + c
    else:                               # minutes[:seconds]
        seconds = a * 60 + b
    return max(1, math.ceil(seconds / 60))


def check_slurm(settings: SlurmSettings) -> None:
    """sbatch is on PATH and accepts these resources (`sbatch --test-only`: nothing is submitted)."""
    if shutil.which("sbatch") is None:
        raise SlurmError("--launcher slurm: no `sbatch` on PATH; run the sweep where Slurm's commands are (a login "
                         "node), or start a one-node test cluster with scripts/slurm_local.sh start")
    cmd = ["sbatch", "--test-only", *settings.options(), "--wrap", "true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"--launcher slurm: `sbatch --test-only` did not answer: {e}") from None
    if done.returncode != 0:
        lines = [x.strip() for x in (done.stderr + done.stdout).splitlines() if x.strip()]
        why = "; ".join(dict.fromkeys(re.sub(r"^sbatch: error: ", "", x) for x in lines)) or f"exit {done.returncode}"
        raise SlurmError(f"Slurm refuses the resources {' '.join(settings.options())}: {why}")
    time_minutes(settings.time)


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm job id (e.g. 1234_5) -> its squeue state, for the ids that are still in the queue."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        raise SlurmError("cannot see the Slurm queue: no `squeue` on PATH (run this where Slurm's commands are)")
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", str(os.getuid())],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SlurmError(f"cannot see the Slurm queue (needed to know which runs Slurm still holds): squeue failed: "
                         f"{' '.join(done.stderr.split()) or done.returncode}")
    states = {}
    for line in done.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        states[jid] = state
    return {j: states[j] for j in job_ids if j in states}


def ended_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's final state of ended jobs (COMPLETED, CANCELLED, TIMEOUT, ...) where accounting (sacct) works."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        done = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        jid, _, state = line.partition("|")
        out[jid] = state.split()[0] if state else ""
    return out


def _key(data: str, run_name: str, seed) -> str:
    return f"{data}/{run_name}/seed{seed}"


def read_record(exp: Path) -> dict:
    """run key -> {"job_id", "log", "submitted", "action"} of its latest submission."""
    path = exp / RECORD
    try:
        return json.loads(path.read_text())["runs"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it to forget the Slurm job ids") from None


def active_runs(exp: Path) -> dict[str, tuple[str, str]]:
    """run key -> (Slurm job id, pending|running) for the runs of EXP that Slurm still holds."""
    record = read_record(exp)
    if not record or shutil.which("squeue") is None:
        return {}
    states = queue_states([r["job_id"] for r in record.values()])
    return {k: (r["job_id"], ACTIVE.get(states[r["job_id"]], "running"))
            for k, r in record.items() if r["job_id"] in states}


class RunTask:
    """One array task: plan the run now (skip / resume / start), run `run.py` as a child, report its end.

    Planned when the task starts, not when it was submitted: a requeued task finds the run's model_latest.pth
    and resumes it."""

    def __init__(self, exp: Path, job: Job, extra: list[str]):
        self.exp, self.job, self.extra = exp, job, list(extra)
        self._child: subprocess.Popen | None = None
        self._waiter: threading.Thread | None = None

    # pickled by submitit into EXP/sweep_logs/slurm/: plain values only, so that a queued task survives edits of
    # the code it is read back with (only this class must keep its name)
    def __getstate__(self):
        return {"exp": str(self.exp), "job": {**vars(self.job), "preset": str(self.job.preset)}, "extra": self.extra}

    def __setstate__(self, state):
        job = dict(state["job"], preset=Path(state["job"]["preset"]))
        self.__init__(Path(state["exp"]), Job(**job), state["extra"])

    def log_path(self) -> Path:
        return self.exp / "sweep_logs" / self.job.data / f"{self.job.run_name}_seed{self.job.seed}.log"

    def __call__(self) -> str:
        action, run_dir = plan(self.exp, self.job)
        if action == "skip":
            return f"finished in {run_dir}"
        cmd = command(self.exp, self.job, action, run_dir, self.extra)
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        jid = os.environ.get("SLURM_ARRAY_JOB_ID")
        jid = f"{jid}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if jid else os.environ.get("SLURM_JOB_ID", "local")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(log, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {action} in Slurm job {jid} (restart {restarts}) "
                    f"on {os.uname().nodename}: {shlex.join(cmd)}\n")
            f.flush()
            # SIGUSR2 (submitit's time-limit warning, which Slurm sends to every process of the job) is for this
            # task only: the run would die of it. The task answers it with one SIGTERM to the run (checkpoint()).
            env = dict(os.environ)
            if "SLURM_CPUS_PER_TASK" in env and "OMP_NUM_THREADS" not in env:
                env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]  # torch would use every core of the node
            self._child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            f.write(f"=== pid {self._child.pid}\n")
            f.flush()
            # wait in a thread: the main thread stays free for submitit's signal handlers (checkpoint below)
            self._waiter = threading.Thread(target=self._child.wait, daemon=True)
            self._waiter.start()
            while self._waiter.is_alive():
                self._waiter.join(0.5)
            rc = self._child.returncode
            f.write(f"=== exit status {rc}\n")
        if rc == 0 and any(r.status == "finished" for r in existing_runs(self.exp, self.job)):
            return "finished"
        raise RuntimeError(f"{self.job.label}: run.py ended with exit status {rc} before the run finished; see {log}")

    def checkpoint(self):
        """Called by submitit on SIGUSR2 (time limit near, or preemption): the run saves model_latest.pth and
        stops; the task is requeued with itself (which plans a resume when it starts again)."""
        import submitit

        child = self._child
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            if self._waiter is not None:
                self._waiter.join(SIGNAL_DELAY_S - 15)
            with open(self.log_path(), "a") as f:  # the task exits from submitit's handler, not from __call__
                f.write(f"=== exit status {child.returncode}; the task is requeued\n")
        return submitit.helpers.DelayedSubmission(RunTask(self.exp, self.job, self.extra))


def make_executor(folder: Path, settings: SlurmSettings, n: int):
    """A submitit SlurmExecutor whose batch submissions are one array of `n` tasks."""
    import submitit

    # a task that reaches its time limit is requeued (the run resumes) up to MAX_TIMEOUTS times
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**executor_parameters(settings, n))
    return executor


def executor_parameters(settings: SlurmSettings, n: int) -> dict:
    """submitit's SlurmExecutor parameters for an array of `n` tasks."""
    extra = dict(settings.sbatch)
    if settings.mem is not None:
        extra["mem"] = settings.mem   # as written (submitit's own mem is a number of GB)
    params = {"job_name": "gazesup_sweep", "time": time_minutes(settings.time), "signal_delay_s": SIGNAL_DELAY_S,
              "array_parallelism": min(settings.max_parallel or n, n), "stderr_to_stdout": True,
              # the tasks unpickle experiments.slurm.RunTask: this repository must be importable wherever they run
              "setup": [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
              "partition": settings.partition, "gpus_per_task": settings.gpus_per_task,
              "cpus_per_task": settings.cpus_per_task, "account": settings.account, "qos": settings.qos,
              "additional_parameters": extra or None}
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(folder: Path, settings: SlurmSettings, n: int) -> str:
    """The script submitit writes for an array of `n` tasks (shown by --dry_run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(settings, n)
    cmd = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=cmd, folder=folder, map_count=n if n > 1 else None, **params)


def write_record(exp: Path, runs: dict) -> None:
    write_text_atomic(exp / RECORD, json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n")


def launch(exp: Path, jobs: list[Job], extra: list[str], settings: SlurmSettings, dry_run: bool,
           executor=None, checked: bool = False) -> tuple[list[tuple], list[tuple[Job, str]]]:
    """Submit every job that is neither finished nor held by Slurm, as one array.

    Args:
        executor: a submitit executor (tests pass a LocalExecutor); default the Slurm one.
        checked: `check_slurm(settings)` has passed already.
    Returns:
        (submitted (job, action, submitit job), left (job, why not submitted)).
    """
    exp = exp.resolve()
    if executor is None and not checked and (not dry_run or shutil.which("sbatch")):
        check_slurm(settings)
    else:
        time_minutes(settings.time)
    record = read_record(exp)
    active = active_runs(exp) if executor is None else {}
    todo, left = [], []
    for job in jobs:
        key = _key(job.data, job.run_name, job.seed)
        if key in active:
            jid, state = active[key]
            left.append((job, f"{state} in Slurm job {jid}: left alone"))
            continue
        action, run_dir = plan(exp, job)
        if action == "skip":
            left.append((job, f"finished in {run_dir}: skipped"))
        else:
            todo.append((job, action, run_dir))
    if dry_run:
        for job, why in left:
            print(f"{job.label}: {why}")
        for i, (job, action, run_dir) in enumerate(todo):
            print(f"{job.label}: array task {i}: {action} {shlex.join(command(exp, job, action, run_dir, extra))}")
        if todo:
            print(f"--- the sbatch script of the array ({len(todo)} tasks, at most "
                  f"{min(settings.max_parallel or len(todo), len(todo))} at once):")
            print(sbatch_script(exp / "sweep_logs" / "slurm", settings, len(todo)))
        return [], left
    if not todo:
        return [], left
    folder = exp / "sweep_logs" / "slurm"
    if executor is None:
        executor = make_executor(folder, settings, len(todo))
    with executor.batch():
        pending = [executor.submit(RunTask(exp, job, extra)) for job, _, _ in todo]
    submitted = []
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    for (job, action, _), sj in zip(todo, pending):
        record[_key(job.data, job.run_name, job.seed)] = {
            "job_id": str(sj.job_id), "action": action, "submitted": when,
            "log": str(RunTask(exp, job, extra).log_path())}
        submitted.append((job, action, sj))
    write_record(exp, record)
    return submitted, left


def wait(job_ids: list[str], poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    """Until none of `job_ids` is in the Slurm queue (TimeoutError after `timeout_s`)."""
    end = None if timeout_s is None else time.time() + timeout_s
    while queue_states(job_ids):
        if end is not None and time.time() > end:
            raise TimeoutError(f"Slurm jobs {', '.join(job_ids)} still queued after {timeout_s} s")
        time.sleep(poll_s)


def main(exp: Path, jobs: list[Job], extra: list[str], args, roots: dict) -> int:
    """`run.py sweep --launcher slurm`: 0 when submitted (with --wait: when every run finished), 1 otherwise."""
    settings = settings_from(args)
    if args.dry_run:
        time_minutes(settings.time)
    else:
        check_slurm(settings)
    # the local sweep's checks before anything is submitted, and each job's identity: a run of the same name
    # with other settings (a smoke test) is another experiment, neither skipped nor resumed (sweep.plan)
    preflight(exp, jobs, roots, extra)
    for job in jobs:
        for line in other_settings(exp, job):
            print(line if args.dry_run else f"sweep: {line}")
    if args.dry_run:
        launch(exp, jobs, extra, settings, dry_run=True)
        return 0
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --exp_path {exp}: {e}") from None
    with SweepLock(exp):   # a local sweep of EXP (or a second submission) cannot run meanwhile
        submitted, left = launch(exp, jobs, extra, settings, dry_run=False, checked=True)
    for job, why in left:
        print(f"sweep: {job.label}: {why}")
    for job, action, sj in submitted:
        print(f"sweep: {job.label}: {action}, Slurm job {sj.job_id}")
    if not submitted:
        print("sweep: nothing to submit")
    else:
        array = str(submitted[0][2].job_id).split("_")[0]
        print(f"sweep: submitted {len(submitted)} runs as Slurm job {array}; follow them with "
              f"`python run.py sweep --status {exp}`; logs in {exp / 'sweep_logs'}", flush=True)
    if not args.wait:
        return 0
    try:
        wait([str(sj.job_id) for _, _, sj in submitted])
    except KeyboardInterrupt:
        print(f"sweep: stopped waiting; the runs go on in Slurm (python run.py sweep --status {exp})")
        return 130
    rows = status_rows(exp)
    print(status_table(rows))
    wanted = {_key(j.data, j.run_name, j.seed) for j in jobs}
    return 0 if all(r["state"] == "finished" for r in rows if r["key"] in wanted) else 1


def status_rows(exp: Path) -> list[dict]:
    """Every run of EXP (from its run folders and the Slurm record): key, label, state, job id, where."""
    exp = exp.resolve()
    record = read_record(exp)
    runs: dict[str, dict] = {}
    for cfg in sorted(exp.glob("*/*/*/config.yaml")):
        run = read_run(cfg.parent)
        if run.status == "evaluation" or run.seed is None:
            continue
        key = _key(cfg.parent.parent.name, run.run_name, run.seed)
        entry = runs.setdefault(key, {"key": key, "label": f"{cfg.parent.parent.name}/{run.run_name} seed {run.seed}",
                                      "folders": []})
        entry["folders"].append(run)
    for key in record:
        data, name, seed = key.rsplit("/", 2)
        runs.setdefault(key, {"key": key, "label": f"{data}/{name} {seed.replace('seed', 'seed ')}", "folders": []})
    ids = [r["job_id"] for r in record.values()]
    queued = queue_states(ids) if ids and shutil.which("squeue") else {}
    ended = ended_states([j for j in ids if j not in queued])
    rows = []
    for key in sorted(runs):
        entry = runs[key]
        rec = record.get(key)
        jid = rec["job_id"] if rec else ""
        finished = [r for r in entry["folders"] if r.status == "finished"]
        folder = (finished or entry["folders"] or [None])[-1]
        where = str(folder.path) if folder else (rec or {}).get("log", "")
        if finished:
            state = "finished"
        elif jid in queued:
            state = ACTIVE.get(queued[jid], "running")
        elif rec:
            state, why = "failed", ended.get(jid) or _last_exit(Path(rec["log"]))
            where = f"{rec['log']}" + (f" ({why})" if why else "")
        else:
            state = "unfinished"   # a local sweep's run that was stopped, or is running now
        rows.append({"key": key, "label": entry["label"], "state": state, "job_id": jid, "where": where})
    return rows


def _last_exit(log: Path) -> str:
    try:
        found = re.findall(r"=== exit status (-?\d+)", log.read_text())
    except OSError:
        return "never started"
    return f"last exit status {found[-1]}" if found else "ended without an exit status: cancelled or killed"


def status_table(rows: list[dict]) -> str:
    lines = [f"{'run':<48} {'state':<10} {'slurm job':<12} folder / log"]
    lines += [f"{r['label']:<48} {r['state']:<10} {r['job_id'] or '-':<12} {r['where']}" for r in rows]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs")
    return "\n".join(lines)
