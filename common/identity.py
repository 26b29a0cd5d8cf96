"""A run's identity: every recorded setting that can change its results, the dataset spec's content
included. The sweep's skip/resume rule and summarize's grouping both use `run_identity`, so a run of a
preset with other settings (a smoke test with fewer iterations) is never taken for the preset's run."""
from pathlib import Path

import yaml

from common.dataspec import load_spec, spec_record
from common.errors import UserError

SPEC_FILE = "data_spec.yaml"  # RUN/data_spec.yaml: the resolved dataset spec the run was trained on


def read_recorded_spec(run_dir: Path) -> dict | None:
    """RUN/data_spec.yaml as recorded, or None (a run recorded before specs were, or an unreadable file)."""
    try:
        raw = yaml.safe_load((Path(run_dir) / SPEC_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def run_identity(settings: dict, spec: dict | None, defaults: dict, neutral) -> dict:
    """The settings that define a run's experiment: all but `neutral` (parse_args.RESULT_NEUTRAL: the flags
    that cannot change results), with `data` replaced by the dataset spec's content (`spec`: as the run
    recorded it; None for a run recorded before specs were: its `data` as it loads now).

    Args:
        settings: the run's recorded settings (config.yaml) or the settings a new run would record.
        spec: the recorded dataset spec (common.dataspec.spec_record), or None.
        defaults: every flag's default (a run recorded before a flag existed ran with its default).
        neutral: the flag names left out.
    """
    identity = {k: v for k, v in {**defaults, **settings}.items() if k not in neutral}
    if spec is None:
        try:
            spec = spec_record(load_spec(identity.get("data")))
        except UserError:
            spec = {"name": identity.get("data")}
    identity["data"] = spec
    if identity.get("method") == "gaze_sup" and not identity.get("thresholds"):  # as the run records them
        table = spec.get("thresholds") or {}
        levels = identity.get("num_levels")
        found = table.get(levels, table.get(str(levels)))
        identity["thresholds"] = [float(t) for t in found] if found else None
    elif identity.get("method") == "full_sup":
        identity["thresholds"] = None  # not used without gaze
    if isinstance(identity.get("features"), tuple):
        identity["features"] = list(identity["features"])
    return identity


def differing_keys(a: dict, b: dict) -> list[str]:
    """The settings on which two identities differ (`data.<key>` for a key of the dataset spec)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key == "data" and isinstance(va, dict) and isinstance(vb, dict):
            out += [f"data.{k}" for k in sorted(set(va) | set(vb), key=str) if va.get(k) != vb.get(k)]
        else:
            out.append(key)
    return out


def identity_value(identity: dict, key: str):
    """The value of a `differing_keys` key in an identity."""
    if key.startswith("data."):
        spec = identity.get("data")
        return spec.get(key[5:]) if isinstance(spec, dict) else None
    return identity.get(key)


def identity_differences(a: dict, b: dict) -> list[str]:
    """`key a_value vs b_value` for every setting on which two identities differ."""
    return [f"{k} {identity_value(a, k)} vs {identity_value(b, k)}" for k in differing_keys(a, b)]
