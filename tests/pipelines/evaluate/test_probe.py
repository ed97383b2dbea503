"""`darkmatter eval` end to end: real Ray, a real MLflow store, images from the committed sample."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.cli import main as cli_main
from pipelines.config import config_to_yaml, load_config
from pipelines.evaluate.inference import BackboneSpec, build_frozen_backbone, resolve_checkpoint
from pipelines.evaluate.probe import RESULT_KEYS, split_features
from pipelines.ingest.sources import ImageSource
from ssl_models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def subset(split: str, rows: int, out: Path, corrupt: int = 0) -> Path:
    """The first ``rows`` images of a sample split (+ ``corrupt`` undecodable rows)."""
    table = pq.read_table(SAMPLE / f"{split}.parquet", columns=["image", "label"]).slice(0, rows)
    if corrupt:
        bad = pa.table({"image": [b"not a jpeg"] * corrupt, "label": [0] * corrupt})
        table = pa.concat_tables([table, bad.cast(table.schema)])
    pq.write_table(table, out)
    return out


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("eval-data")
    return subset("train", 400, folder / "train.parquet", corrupt=2), subset(
        "test", 200, folder / "test.parquet"
    )


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A real MLflow run holding a backbone.pt and the config.yaml of a (tiny) pretraining."""
    folder = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = load_config(
        None,
        [
            f"data.train.path={SAMPLE / 'train.parquet'}",
            "data.recipe.size=32",
            "backbone.name=resnet18",
        ],
    )
    torch.manual_seed(1)
    backbone = build_backbone("resnet18", False, 32)
    (folder / "backbone.pt").write_bytes(b"")
    torch.save(backbone.model.state_dict(), folder / "backbone.pt")
    (folder / "config.yaml").write_text(config_to_yaml(config))
    client = MlflowClient(uri)
    experiment = client.create_experiment("tests", artifact_location=(folder / "art").as_uri())
    run_id = client.create_run(experiment, run_name="pretrain").info.run_id
    for step, loss in enumerate([4.0, 3.5, 3.2], start=1):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_artifact(run_id, str(folder / "backbone.pt"))
    client.log_artifact(run_id, str(folder / "config.yaml"))
    client.set_terminated(run_id)
    return uri, run_id, folder


def test_pipeline_features_equal_the_model_on_each_image(ray_session, splits, pretrained_run):
    uri, run_id, _ = pretrained_run
    checkpoint = resolve_checkpoint(run_id, uri)
    assert checkpoint.spec == BackboneSpec("resnet18", False, 32)
    features, labels, keys, counts = split_features(
        ImageSource(str(splits[1]), label_column="label"), checkpoint, "test", batch_size=64
    )
    assert features.shape == (200, 512) and counts["skipped"] == 0
    table = pq.read_table(splits[1]).to_pydict()
    order = [int(k.rsplit("#", 1)[1]) for k in keys]
    assert labels.tolist() == [table["label"][i] for i in order]
    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(table["image"][i])).convert("RGB")) for i in order[:16]]
    )
    model = build_frozen_backbone(checkpoint.spec, checkpoint.state_dict)
    mean, std = torch.tensor(checkpoint.spec.mean), torch.tensor(checkpoint.spec.std)
    x = (torch.from_numpy(images).float() / 255 - mean) / std
    with torch.no_grad():
        expected = model(x.permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(features[:16], expected, rtol=1e-4, atol=1e-4)


# Ray Data warns when a one-file source (one read unit) cannot use its task concurrency.
@pytest.mark.filterwarnings("ignore:The maximum number of concurrent tasks:UserWarning")
def test_eval_of_an_mlflow_run(ray_session, splits, pretrained_run, tmp_path, capsys):
    uri, run_id, _ = pretrained_run
    out = tmp_path / "results.json"
    reports = tmp_path / "reports"
    code = cli_main(
        ["eval", run_id, "--train", str(splits[0]), "--test", str(splits[1]),
         "--json", str(out), "--tracking-uri", uri, "--k", "20", "--reports", str(reports)]
    )  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) == set(RESULT_KEYS)
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert results["knn_top1"] > 0.15  # random features of CIFAR beat chance (0.1) clearly
    printed = capsys.readouterr().out
    assert "kNN top-1 (k=20, T=0.1)" in printed and "400 / 200  (skipped 2 / 0)" in printed
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["eval/knn_top1"] == pytest.approx(results["knn_top1"])
    assert run.data.metrics["eval/linear_1pct_top1"] == pytest.approx(results["linear_1pct_top1"])
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "eval")}
    names = {"retrieval.png", "projection.png", "singular_values.png", "training_curves.png"}
    assert logged == {f"eval/{n}" for n in names}
    assert {p.name for p in reports.iterdir()} == names


def test_eval_of_a_file_logs_a_new_run_naming_it(ray_session, splits, pretrained_run, tmp_path):
    uri, _, folder = pretrained_run
    out = tmp_path / "results.json"
    code = cli_main(
        ["eval", str(folder / "backbone.pt"), "--train", str(splits[0]), "--test", str(splits[1]),
         "--json", str(out), "--tracking-uri", uri]
    )  # fmt: skip
    assert code == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("darkmatter-eval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["darkmatter.evaluated"] == str((folder / "backbone.pt").resolve())
    assert run.data.metrics["eval/linear_top1"] == pytest.approx(
        json.loads(out.read_text())["linear_top1"]
    )


def test_eval_refuses_what_it_cannot_load(tmp_path, capsys, splits):
    args = ["--train", str(splits[0]), "--test", str(splits[1])]
    assert cli_main(["eval", "nonsense", *args]) == 2
    assert "'nonsense' is neither an existing file" in capsys.readouterr().err
    torch.save(build_backbone("resnet18").model.state_dict(), tmp_path / "weights.pt")
    assert cli_main(["eval", str(tmp_path / "weights.pt"), *args]) == 2
    assert "give --backbone and --image-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not fit backbone 'resnet50'"):
        build_frozen_backbone(
            BackboneSpec("resnet50", False, 32),
            torch.load(tmp_path / "weights.pt", weights_only=True),
        )


def test_eval_of_several_read_units_finishes_on_a_two_cpu_ray(tmp_path):
    """The full CIFAR-10 (5 train shards) hung on 2 CPUs: two inference actors held 1.75 CPU
    and the 1-CPU decode task waited for ever. Four train shards (four read units) on a
    2-CPU Ray of its own: the probes come back."""
    shards = [subset("train", 100, tmp_path / f"train-{i}.parquet") for i in range(4)]
    test = subset("test", 100, tmp_path / "test.parquet")
    out = tmp_path / "eval.json"
    script = (
        "import sys, ray; from pipelines.cli import main; "
        "ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False); "
        "sys.exit(main(sys.argv[1:]))"
    )
    args = ["eval", "random", "--backbone", "resnet18", "--image-size", "32", "--no-mlflow"]
    args += ["--train", ",".join(map(str, shards)), "--test", str(test), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads(out.read_text())) == set(RESULT_KEYS)


def test_the_run_configs_pool_reaches_the_evaluated_backbone():
    # I-JEPA's recipe evaluates the mean patch token (configs/ijepa_cifar10.yaml).
    spec = BackboneSpec.from_run_config(REPO / "configs" / "ijepa_cifar10.yaml")
    assert (spec.name, spec.pool) == ("vit_tiny", "mean")
    assert build_frozen_backbone(spec, None).pool == "mean"
