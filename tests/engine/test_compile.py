"""--compile (the recommended GPU path) trains like eager on CPU, including a partial last batch, which
gets its own static graph (torch.compile(dynamic=False)) instead of turning the main graph dynamic.

The backend is aot_eager: TorchDynamo's capture of the model (the custom propagation Function included)
and AOTAutograd's joint graph are what this code can break; TorchInductor's code generation would take
~10 minutes on 2 cores here, and scripts/device_benchmark.sh runs it on a GPU."""
import csv
import functools

import pytest
import torch

import run
from tests.helpers import only_run_dir, tiny_argv, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(exp) -> list:
    with open(only_run_dir(exp) / "losses.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_compiled_training_matches_eager_with_a_partial_batch(tmp_path, monkeypatch):
    graphs = []  # the input shapes of every graph the trainer's torch.compile produced

    def recording_aot_eager(gm, example_inputs):  # shapes as traced: symbolic sizes stay torch.SymInt
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        graphs.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_aot_eager))
    root = tiny_dataset(tmp_path / "data", num_train=6, num_test=2)  # batch 4: steps of 4 and 2 images
    flags = ["--max_ite", "4", "--log_step", "1", "--val_step", "100", "--save_step", "100", "--quiet"]
    torch._dynamo.reset()
    assert run.main(tiny_argv(root, tmp_path / "eager", *flags)) == 0
    assert run.main(tiny_argv(root, tmp_path / "compiled", *flags, "--compile")) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # one static graph per batch size (4, then the partial 2); no symbolic sizes
    images = [shapes[0] for shapes in graphs]
    assert sorted(s[0] for s in images) == [2, 4] and all(s[1:] == (3, 32, 32) for s in images), graphs
    assert all(isinstance(d, int) for shapes in graphs for shape in shapes for d in shape), graphs
    torch._dynamo.reset()
