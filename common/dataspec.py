"""A dataset is a small YAML spec: file formats, channels, normalisation, gaze-map recipe, thresholds.

`--data` takes a built-in name (`kvasir`, `prostate`: the files in configs/data/) or a path to a spec
file. Every key is checked; an unknown key or a bad value is a `SpecError` naming the file and the key.

    name: kvasir                 # folder name of runs (EXP/<seed>/<name>/...)
    image_ext: .jpg              # ROOT/images/<id><image_ext>   (.jpg .jpeg .png .dcm)
    mask_ext: .jpg               # ROOT/masks/<id><mask_ext>     (.jpg .jpeg .png)
    gaze_ext: .jpg               # ROOT/gaze/<dir>/<id><gaze_ext> (.jpg .jpeg .png)
    in_channels: 3               # 3 (RGB) or 1 (gray / DICOM)
    normalization: imagenet      # imagenet | per_image_zscore | {mean: [...], std: [...]}
    heatmap: {canvas: 768, sigma: 70}
    crf: {sxy: 80, srgb: 13, compat: 1, n_iter: 10}   # or null: gaze maps are the heatmaps
    thresholds: {1: [0.5], 2: [0.5, 0.3]}            # number of levels -> one threshold per level

Normalisation: `imagenet` is per channel (x / 255 - mean) / std with ImageNet statistics (the paper's
Kvasir); `per_image_zscore` is (x - mean(x)) / std(x) over the image (the paper's prostate);
`{mean, std}` is per channel (x / 255 - mean) / std for 8-bit images and (x - mean) / std otherwise.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import yaml

from common.errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".dcm")
MAP_EXTS = (".jpg", ".jpeg", ".png")
CRF_KEYS = ("sxy", "srgb", "compat", "n_iter")


class SpecError(UserError):
    """A dataset spec that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class DataSpec:
    """Everything dataset-specific. Built by `load_spec`; see the module docstring for the keys."""
    name: str
    image_ext: str
    mask_ext: str
    gaze_ext: str
    in_channels: int
    normalization: Union[str, Tuple[Tuple[float, ...], Tuple[float, ...]]]
    heatmap_canvas: int = 768
    heatmap_sigma: float = 70.0
    crf: Optional[Dict[str, float]] = None
    thresholds: Dict[int, List[float]] = field(default_factory=dict)
    source: str = ""  # the spec file

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """An image as stored ((H, W, 3) uint8 RGB, (H, W) gray, float DICOM) -> (C, H, W) float32."""
        x = image.astype(np.float32)
        if self.normalization == "per_image_zscore":
            std = float(x.std())
            x = (x - x.mean()) / (std if std > 0 else 1.0)
        else:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.normalization == "imagenet" else self.normalization
            if image.dtype == np.uint8:
                x = x / 255.0
            x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
        return x.transpose(2, 0, 1) if x.ndim == 3 else x[None]

    def level_thresholds(self, num_levels: int, override=None) -> List[float]:
        """One threshold per level: `override` (--thresholds) or the spec's table."""
        if override:
            if len(override) != num_levels:
                raise SpecError(f"--thresholds has {len(override)} values but --num_levels is {num_levels}")
            return [float(t) for t in override]
        if num_levels not in self.thresholds:
            raise SpecError(f"{self.source}: no thresholds for {num_levels} level(s) (the spec has "
                            f"{sorted(self.thresholds)}); pass --thresholds with {num_levels} values")
        return list(self.thresholds[num_levels])


def builtin_specs() -> List[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def spec_path(data: str) -> Path:
    """The spec file of a built-in name or a path."""
    text = str(data)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise SpecError(f"dataset spec not found: {path}")
        return path
    path = BUILTIN_DIR / f"{text}.yaml"
    if not path.is_file():
        from common.version import install_problem
        raise SpecError(f"unknown --data {text!r}: built-in datasets are {builtin_specs()}, or give a spec file "
                        f"(a .yaml path){install_problem()}")
    return path


def _expect(cond: bool, source, key: str, value, expected: str) -> None:
    if not cond:
        raise SpecError(f"{source}: key {key!r} is {value!r}; expected {expected}")


def _number(source, key: str, value, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    _expect(ok and (value > 0 if positive else True), source, key, value,
            "a positive number" if positive else "a number")
    return float(value)


def _ext(source, key: str, value, allowed) -> str:
    _expect(isinstance(value, str) and value.lower() in allowed, source, key, value, f"one of {list(allowed)}")
    return value


def _normalization(source, value, channels: int):
    if value in ("imagenet", "per_image_zscore"):
        _expect(value != "imagenet" or channels == 3, source, "normalization", value,
                "per_image_zscore or {mean, std} for in_channels 1 (imagenet needs 3 channels)")
        return value
    _expect(isinstance(value, dict) and set(value) == {"mean", "std"}, source, "normalization", value,
            "imagenet, per_image_zscore or a mapping {mean: [...], std: [...]}")
    out = []
    for k in ("mean", "std"):
        v = value[k] if isinstance(value[k], list) else [value[k]]
        _expect(len(v) == channels, source, f"normalization.{k}", value[k], f"{channels} number(s) (in_channels)")
        out.append(tuple(_number(source, f"normalization.{k}", x, positive=(k == "std")) for x in v))
    return tuple(out)


def parse_spec(raw, source) -> DataSpec:
    """Validate a spec mapping (as read from YAML); `source` names it in errors."""
    _expect(isinstance(raw, dict), source, "<top level>", type(raw).__name__, "a mapping of keys to values")
    keys = {"name", "image_ext", "mask_ext", "gaze_ext", "in_channels", "normalization", "heatmap", "crf",
            "thresholds"}
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(keys)}")
    missing = sorted(k for k in ("name", "image_ext", "mask_ext", "gaze_ext", "in_channels", "normalization")
                     if k not in raw)
    if missing:
        raise SpecError(f"{source}: missing key(s) {missing}")
    name = raw["name"]
    _expect(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), source, "name", name,
            "a short name of letters, digits, - and _")
    channels = raw["in_channels"]
    _expect(channels in (1, 3) and not isinstance(channels, bool), source, "in_channels", channels, "1 or 3")
    heatmap = raw.get("heatmap") or {}
    _expect(isinstance(heatmap, dict) and set(heatmap) <= {"canvas", "sigma"}, source, "heatmap", heatmap,
            "a mapping with canvas and/or sigma")
    canvas = heatmap.get("canvas", 768)
    _expect(isinstance(canvas, int) and not isinstance(canvas, bool) and canvas >= 8, source, "heatmap.canvas",
            canvas, "a whole number of pixels >= 8")
    sigma = _number(source, "heatmap.sigma", heatmap.get("sigma", 70.0))
    crf = raw.get("crf")
    if crf is not None:
        _expect(isinstance(crf, dict) and set(crf) == set(CRF_KEYS), source, "crf", crf,
                f"null or a mapping with exactly {list(CRF_KEYS)}")
        crf = {k: _number(source, f"crf.{k}", crf[k]) for k in CRF_KEYS}
        _expect(crf["n_iter"] == int(crf["n_iter"]), source, "crf.n_iter", crf["n_iter"], "a whole number")
        crf["n_iter"] = int(crf["n_iter"])
    thresholds = raw.get("thresholds") or {}
    _expect(isinstance(thresholds, dict), source, "thresholds", thresholds, "a mapping: levels -> thresholds")
    table = {}
    for levels, values in thresholds.items():
        key = f"thresholds.{levels}"
        _expect(isinstance(levels, int) and levels >= 1, source, key, levels, "a number of levels >= 1")
        _expect(isinstance(values, list) and len(values) == levels, source, key, values,
                f"a list of {levels} threshold(s)")
        for t in values:
            _expect(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1, source, key, values,
                    "thresholds strictly between 0 and 1")
        table[levels] = [float(t) for t in values]
    return DataSpec(name=name, image_ext=_ext(source, "image_ext", raw["image_ext"], IMAGE_EXTS),
                    mask_ext=_ext(source, "mask_ext", raw["mask_ext"], MAP_EXTS),
                    gaze_ext=_ext(source, "gaze_ext", raw["gaze_ext"], MAP_EXTS), in_channels=channels,
                    normalization=_normalization(source, raw["normalization"], channels),
                    heatmap_canvas=canvas, heatmap_sigma=sigma, crf=crf, thresholds=table, source=str(source))


def spec_record(spec: DataSpec) -> dict:
    """Every key of a resolved spec as a mapping `parse_spec` accepts: what a run records of its dataset."""
    norm = spec.normalization
    if not isinstance(norm, str):
        norm = {"mean": list(norm[0]), "std": list(norm[1])}
    return {"name": spec.name, "image_ext": spec.image_ext, "mask_ext": spec.mask_ext, "gaze_ext": spec.gaze_ext,
            "in_channels": spec.in_channels, "normalization": norm,
            "heatmap": {"canvas": spec.heatmap_canvas, "sigma": spec.heatmap_sigma},
            "crf": dict(spec.crf) if spec.crf is not None else None,
            "thresholds": {int(k): list(v) for k, v in sorted(spec.thresholds.items())}}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml_unique(text: str):
    """yaml.safe_load, but a duplicated key in a mapping is a yaml.YAMLError naming the key and line."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


_CACHE: Dict[Path, DataSpec] = {}


def load_spec(data) -> DataSpec:
    """The DataSpec of `data`: a built-in name, a path to a YAML spec, or a DataSpec (returned as is)."""
    if isinstance(data, DataSpec):
        return data
    path = spec_path(data).resolve()
    if path not in _CACHE:
        try:
            raw = load_yaml_unique(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            why = f"{e.problem} at line {mark.line + 1}" if mark is not None and getattr(e, "problem", None) \
                else " ".join(str(e).split())
            raise SpecError(f"{path}: cannot read the dataset spec: {why}") from None
        _CACHE[path] = parse_spec(raw, path)
    return _CACHE[path]
