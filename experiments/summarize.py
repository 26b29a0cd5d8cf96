"""`python run.py summarize EXP_PATH`: one table of every training run under EXP_PATH.

Writes EXP_PATH/summary.csv and summary.md (one row per dataset and preset/run_name: seeds, final-iteration
and best-checkpoint Dice as mean ± std over seeds, IoU, HD95, wall time, the card), runs.csv (every run
folder with its status) and curves.png (test Dice against iteration, one line per preset: the mean over
seeds, the band spans the seeds' minimum to maximum), and prints the table. Unfinished, failed or
duplicated runs are listed, not averaged. The std is the sample standard deviation (ddof=1), blank with one
seed. Torch-free: it only reads config.yaml, metrics.json and losses.csv.
"""
import csv
import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import OneLineParser, UserError, command_name
from common.files import atomic_path, write_text_atomic
from common.identity import differing_keys, identity_value, read_recorded_spec, run_identity
from parse_args import RESULT_NEUTRAL, default_settings

_STAMP = re.compile(r"_\d{8}-\d{6}(-\d+)?$")
_EVALUATION = re.compile(r"_test_\d{8}-\d{6}(-\d+)?$")  # the folder --test writes (engine.run_folder)


class SummaryError(UserError):
    """EXP_PATH cannot be summarised (missing, no runs)."""


@dataclass
class Run:
    """One run folder: EXP/<seed>/<data>/<run_name>_<timestamp>/.

    status: finished (metrics.json at max_ite), unfinished (no metrics.json), stopped_early (metrics.json
    before max_ite), unreadable (a file that does not parse), duplicate (an older finished copy of a
    finished run: not averaged), evaluation (a --test folder, not a training run).
    """
    path: Path
    data: str
    run_name: str
    seed: int | None
    max_ite: int | None
    status: str
    reason: str = ""
    metrics: dict | None = None
    config: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # common.identity.run_identity: what defines the experiment

    @property
    def key(self) -> tuple[str, str, str]:
        """(data, run_name, identity): runs of one row. Runs that share a name but not their settings differ."""
        return self.data, self.run_name, json.dumps(self.identity, sort_keys=True, default=str)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def malformed_metrics(metrics) -> str:
    """Why metrics.json cannot be summarised ('' when it can): the numbers the table reads must be numbers."""
    if not isinstance(metrics, dict):
        return "not a mapping"
    if not isinstance(metrics.get("final_iteration"), int) or isinstance(metrics.get("final_iteration"), bool):
        return f"final_iteration {metrics.get('final_iteration')!r} is not an integer"
    if not _is_number(_get(metrics, "final", "mdice")):
        return f"final.mdice {_get(metrics, 'final', 'mdice')!r} is not a number"
    for keys in (("train_seconds",), ("final", "miou"), ("final", "mhd95"), ("best", "test", "mdice"),
                 ("best", "test", "miou")):
        v = _get(metrics, *keys)
        if v is not None and not _is_number(v):
            return f"{'.'.join(keys)} {v!r} is not a number"
    if not isinstance(metrics.get("history") or [], list):
        return "history is not a list"
    return ""


def malformed_config(config: dict) -> str:
    """Why config.yaml cannot identify a run ('' when it can)."""
    for key in ("max_ite", "seed"):
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"config.yaml: {key} {v!r} is not an integer"
    return ""


def last_logged_iteration(run_dir: Path) -> int | None:
    """The last iteration in losses.csv (logged every --log_step), or None."""
    try:
        rows = list(csv.reader((run_dir / "losses.csv").read_text().splitlines()))
        return int(rows[-1][0]) if len(rows) > 1 else None
    except (OSError, ValueError, IndexError):
        return None


def read_run(run_dir: Path) -> Run:
    """The run folder's identity (data, run_name, seed) and status, from config.yaml and metrics.json."""
    run_dir = Path(run_dir)
    data = run_dir.parent.name
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        config = f"config.yaml: {' '.join(str(e).split())}"
    if not isinstance(config, dict):
        why = config if isinstance(config, str) else "config.yaml: not a mapping of flags"
        return Run(run_dir, data, _STAMP.sub("", run_dir.name), None, None, "unreadable", why)
    name = config.get("run_name") or _STAMP.sub("", run_dir.name)
    why = malformed_config(config)
    if why:
        return Run(run_dir, data, str(name), None, None, "unreadable", why)
    seed = config.get("seed")
    max_ite = config.get("max_ite")
    identity = run_identity(config, read_recorded_spec(run_dir), default_settings(), RESULT_NEUTRAL)
    run = Run(run_dir, data, str(name), seed, max_ite, "unfinished", config=config, identity=identity)
    if config.get("test") or _EVALUATION.search(run_dir.name):
        run.status, run.reason = "evaluation", "a --test folder"
        return run
    mpath = run_dir / "metrics.json"
    if not mpath.exists():
        last = last_logged_iteration(run_dir)
        resumable = "model_latest.pth saved" if (run_dir / "model_latest.pth").exists() else "no checkpoint"
        run.reason = f"no metrics.json; last logged iteration {last if last is not None else '-'}, {resumable}"
        return run
    try:
        metrics = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        run.status, run.reason = "unreadable", f"metrics.json: {type(e).__name__} {e}"
        return run
    why = malformed_metrics(metrics)
    if why:
        run.status, run.reason = "unreadable", f"metrics.json: {why}"
        return run
    final_iteration = metrics["final_iteration"]
    run.metrics = metrics
    if max_ite is not None and final_iteration < int(max_ite):
        run.status, run.reason = "stopped_early", f"final_iteration {final_iteration} < max_ite {max_ite}"
    else:
        run.status = "finished"
    return run


def find_runs(exp: Path) -> list[Run]:
    """Every folder under `exp` holding a config.yaml, newest folder name last within a preset."""
    runs = [read_run(p.parent) for p in sorted(Path(exp).rglob("config.yaml"))]
    # keep one finished run per (data, run_name, seed): the newest; older finished copies are not averaged
    newest: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: r.path.name):
        if run.status == "finished":
            k = (*run.key, run.seed)
            if k in newest:
                old = newest[k]
                old.status, old.reason = "duplicate", f"a newer finished run of seed {run.seed}: {run.path.name}"
            newest[k] = run
    return runs


# ------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values) of the finite values
    (None and NaN, e.g. an undefined HD95, are left out; the table says over how many runs)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _pct(v):
    return None if v is None else 100 * float(v)


# column -> (label, how to read one run's value); Dice and IoU in %, HD95 in pixels, time in minutes
COLUMNS = {
    "final_dice": ("final Dice %", lambda m: _pct(_get(m, "final", "mdice"))),
    "best_dice": ("best Dice %", lambda m: _pct(_get(m, "best", "test", "mdice"))),
    "final_iou": ("final IoU %", lambda m: _pct(_get(m, "final", "miou"))),
    "best_iou": ("best IoU %", lambda m: _pct(_get(m, "best", "test", "miou"))),
    "final_hd95": ("final HD95 px", lambda m: _get(m, "final", "mhd95")),
    "train_minutes": ("train min", lambda m: None if m.get("train_seconds") is None else m["train_seconds"] / 60),
}


def supervision_kind(config: dict) -> str:
    """What a run was supervised with, from its config.yaml: full, box, box+CRF, points, scribbles (the
    sparse label folder), gaze, gaze+band (--ignore_below), simulated gaze (a gaze folder under sim/)."""
    method = config.get("method", "gaze_sup")
    if method == "full_sup":
        return "full"
    if method == "sparse_sup":
        return str(config.get("label_dir") or "sparse")
    gaze_dir = str(config.get("gaze_dir") or "crf_compat1")
    if gaze_dir in ("box", "box_crf"):
        return {"box": "box", "box_crf": "box+CRF"}[gaze_dir]
    kind = "simulated gaze" if gaze_dir.startswith("sim/") else "gaze"
    return kind + ("+band" if config.get("ignore_below") else "")


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per experiment (data, run_name and every setting that can change results) over its finished
    runs: n, seeds, mean and std of every column; `settings` says how rows that share a name differ."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(run.key, []).append(run)
    rows = []
    for (data, name, _), group in sorted(groups.items()):
        group.sort(key=lambda r: (r.seed if isinstance(r.seed, int) else 0))
        kinds = "/".join(sorted({supervision_kind(r.config) for r in group}))
        row = {"data": data, "preset": name, "supervision": kinds, "n": len(group),
               "seeds": " ".join(str(r.seed) for r in group),
               "settings": distinguishing_settings(group[0], [g[0] for k, g in groups.items()
                                                               if k[:2] == (data, name)]),
               "best_iteration": " ".join(str(_get(r.metrics, "best", "iteration")) for r in group),
               "selected_on": "/".join(sorted({str(_get(r.metrics, "best", "selected_on")) for r in group})),
               "final_iteration": " ".join(sorted({str(r.metrics["final_iteration"]) for r in group})),
               "card": "; ".join(sorted({str(r.metrics.get("device", "?")) for r in group}))}
        for col, (_, read) in COLUMNS.items():
            values = [read(r.metrics) for r in group]
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std(values)
            row[f"{col}_n"] = sum(v is not None and math.isfinite(float(v)) for v in values)
        rows.append(row)
    return rows


def distinguishing_settings(run: Run, same_name: list[Run]) -> str:
    """How `run`'s experiment differs from the others of the same name: `key value` for every setting on which
    they disagree ('' when the name is unique)."""
    keys = sorted({k for other in same_name if other is not run for k in differing_keys(run.identity, other.identity)})
    return ", ".join(f"{k} {identity_value(run.identity, k)}" for k in keys)


# ------------------------------------------------------------------------------------------- outputs
def _num(v, digits: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _pm(row: dict, col: str, digits: int = 2) -> str:
    mean, std = row[f"{col}_mean"], row[f"{col}_std"]
    if not math.isfinite(mean):
        return "-"
    text = _num(mean, digits) + (f" ± {_num(std, digits)}" if math.isfinite(std) else "")
    # a metric some runs lack (HD95 is undefined for an empty prediction) says over how many it is taken
    return text + (f" ({row[f'{col}_n']} of {row['n']})" if row[f"{col}_n"] < row["n"] else "")


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (mean ± sample std over seeds)."""
    head = ["data", "preset", "supervision", "settings", "n", "seeds", "final Dice %", "best Dice %",
            "best selected on", "final IoU %", "best IoU %", "final HD95 px", "train min", "card"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["data"], r["preset"], r["supervision"], r["settings"] or "-", str(r["n"]), r["seeds"],
                 _pm(r, "final_dice"), _pm(r, "best_dice"), r["selected_on"], _pm(r, "final_iou"), _pm(r, "best_iou"),
                 _pm(r, "final_hd95"), _pm(r, "train_minutes", 1), r["card"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_averaged_table(runs: list[Run], exp: Path) -> str:
    rest = [r for r in runs if r.status not in ("finished", "evaluation")]
    if not rest:
        return ""
    lines = ["| data | preset | seed | status | why | folder |", "|---|---|---|---|---|---|"]
    for r in sorted(rest, key=lambda r: (r.data, r.run_name, str(r.seed), r.path.name)):
        lines.append(f"| {r.data} | {r.run_name} | {r.seed} | {r.status} | {r.reason} | "
                     f"{r.path.relative_to(exp)} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], runs: list[Run], exp: Path) -> str:
    legend = ("Mean ± sample standard deviation (ddof=1) over seeds, finished runs only. *final*: the test metrics "
              "after the last iteration. *best*: the test metrics of the checkpoint selected during training "
              "(`model_best.pth`) on the split in *best selected on*: `test` as in the paper, `val` for runs with "
              "`--val_fraction`. HD95 is computed at the last iteration only. *train min*: `train_seconds` of "
              "metrics.json. Runs are averaged only with runs of the same experiment: the same dataset spec and every "
              "setting that can change results (all but the seed, the run's name and place, the device, workers and "
              "logging/saving steps). *settings*: how rows of one preset name differ; `-` when the name is unique.")
    parts = [f"# Summary of {exp}", "", legend, "", markdown_table(rows)]
    rest = not_averaged_table(runs, exp)
    if rest:
        parts += ["", "## Not averaged", "", rest]
    skipped = sum(r.status == "evaluation" for r in runs)
    if skipped:
        parts += ["", f"{skipped} evaluation-only (`--test`) folder(s) are not training runs and are left out."]
    return "\n".join(parts) + "\n"


def summary_csv(rows: list[dict]) -> str:
    """Machine-readable rows: numbers at full precision (Dice/IoU in %, HD95 in px, time in minutes)."""
    keys = ["data", "preset", "supervision", "settings", "n", "seeds", "selected_on", "best_iteration",
            "final_iteration"]
    keys += [f"{c}_{s}" for c in COLUMNS for s in ("mean", "std", "n")] + ["card"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        writer.writerow(["" if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k] for k in keys])
    return out.getvalue()


def runs_csv(runs: list[Run], exp: Path) -> str:
    """Every run folder with its status and its own final / best Dice."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["data", "preset", "seed", "status", "final_dice_pct", "best_dice_pct", "folder", "why"])
    for r in sorted(runs, key=lambda r: (r.data, r.run_name, str(r.seed), r.path.name)):
        final = COLUMNS["final_dice"][1](r.metrics) if r.metrics else None
        best = COLUMNS["best_dice"][1](r.metrics) if r.metrics else None
        writer.writerow([r.data, r.run_name, r.seed, r.status, "" if final is None else final,
                         "" if best is None else best, r.path.relative_to(exp), r.reason])
    return out.getvalue()


def curve(run: Run) -> dict[int, float]:
    """iteration -> test Dice (%) from the run's evaluation history."""
    points = {}
    for h in run.metrics.get("history") or []:
        dice = _get(h, "test", "mdice")
        if dice is not None and h.get("iteration") is not None:
            points[int(h["iteration"])] = 100 * float(dice)
    return points


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 and 4 dash patterns: 28 distinct looks


def line_style(index: int) -> dict:
    """The look of the `index`-th line of a subplot: colour, dash pattern and marker all change with it (the
    dashes and markers cycle at different lengths), so presets with near-equal curves stay distinguishable."""
    return {"color": f"C{index % 10}", "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
            "marker": MARKERS[index % len(MARKERS)], "markevery": 1}


def plot_curves(runs: list[Run], path: Path) -> None:
    """Test Dice against iteration, one subplot per dataset, one line (mean over seeds) per preset, and a
    band from the seeds' minimum to maximum, at the iterations every seed evaluated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], list[dict[int, float]]] = {}
    labels: dict[tuple[str, str, str], str] = {}
    finished = [r for r in runs if r.status == "finished"]
    for run in finished:
        groups.setdefault(run.key, []).append(curve(run))
        same = [r for r in finished if r.key[:2] == run.key[:2]]
        labels[run.key] = run.run_name + (f" [{distinguishing_settings(run, same)}]"
                                          if len({r.key for r in same}) > 1 else "")
    datasets = sorted({k[0] for k in groups}) or ["(no finished runs)"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        drawn = 0
        for key, curves in sorted(groups.items()):
            d, name = key[0], labels[key]
            if d != data:
                continue
            its = sorted(set.intersection(*(set(c) for c in curves)))
            if not its:
                continue
            values = [[c[i] for c in curves] for i in its]
            line, = ax.plot(its, [statistics.fmean(v) for v in values], ms=4, lw=1.4, mfc="none",
                            label=f"{name} (n={len(curves)})", **line_style(drawn))
            drawn += 1
            if len(curves) > 1:
                ax.fill_between(its, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                                alpha=0.2, lw=0)
        ax.set_title(f"{data}: test Dice (line: mean over seeds, band: min-max)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("test Dice %")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def summarize(exp: Path, out: Path | None = None, plot: bool = True) -> tuple[list[dict], list[Run]]:
    """Write summary.csv, summary.md, runs.csv and curves.png for every run under `exp` into `out` (default
    `exp`); return the aggregated rows and the runs."""
    exp = Path(exp)
    if not exp.is_dir():
        raise SummaryError(f"EXP_PATH {exp} is not a folder (expected the --exp_path of the runs)")
    runs = find_runs(exp)
    if not runs:
        raise SummaryError(f"no run folders under {exp} (a run folder holds config.yaml; expected "
                           f"{exp}/<seed>/<data>/<run>/)")
    out = Path(out) if out else exp
    try:
        out.mkdir(parents=True, exist_ok=True)
        rows = aggregate(runs)
        write_text_atomic(out / "summary.csv", summary_csv(rows))
        write_text_atomic(out / "summary.md", summary_markdown(rows, runs, exp))
        write_text_atomic(out / "runs.csv", runs_csv(runs, exp))
        if plot:
            plot_curves(runs, out / "curves.png")
    except OSError as e:
        raise SummaryError(f"cannot write the summary to {out}: {e}") from None
    return rows, runs


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=command_name("run.py summarize"),
                      description="Summarise every run under EXP_PATH: summary.csv, "
                "summary.md, runs.csv and curves.png (mean ± sample std over seeds; unfinished runs listed apart).")
    p.add_argument("exp_path", help="the --exp_path of the runs (searched recursively for run folders)")
    p.add_argument("--out", default=None, help="where the summary files go (default: EXP_PATH)")
    p.add_argument("--no_plot", action="store_true", help="skip curves.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows, runs = summarize(Path(args.exp_path), args.out and Path(args.out), not args.no_plot)
    exp = Path(args.exp_path)
    print(markdown_table(rows))
    rest = not_averaged_table(runs, exp)
    if rest:
        print("\nnot averaged:\n" + rest)
    out = Path(args.out) if args.out else exp
    print(f"\nwrote {out / 'summary.csv'}, summary.md, runs.csv" + ("" if args.no_plot else ", curves.png"))
    return 0


if __name__ == "__main__":
    from common.errors import run_cli
    raise SystemExit(run_cli(main))
