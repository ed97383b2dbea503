"""`darkmatter embed`: every decodable image becomes one parquet row; corrupt files are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.cli import main as cli_main
from pipelines.evaluate.inference import (
    DECODE_CPUS,
    BackboneSpec,
    build_frozen_backbone,
    plan_actors,
    resolve_checkpoint,
)
from pipelines.ingest.dataset import resize_center_crop
from pipelines.ingest.decode import decode_pil

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def image_folder(root: Path, n: int) -> list[Path]:
    """n JPEGs of the sample as files in two class folders, plus one corrupt .jpg."""
    images = pq.read_table(SAMPLE / "test.parquet", columns=["image"]).column("image")
    files = []
    for i in range(n):
        path = root / f"class{i % 2}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images[i].as_py())
        files.append(path)
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return files


def test_embed_writes_one_row_per_image_and_skips_a_corrupt_file(ray_session, tmp_path, capsys):
    files = image_folder(tmp_path / "corpus", 70)
    out = tmp_path / "embeddings"
    args = ["embed", "random", "--backbone", "resnet18", "--image-size", "32"]
    code = cli_main(
        [*args, "--data", str(tmp_path / "corpus"), "--out", str(out), "--batch-size", "16"]
    )
    assert code == 0
    table = pq.read_table(out)
    assert table.num_rows == 70
    assert sorted(table.column("key").to_pylist()) == sorted(str(f) for f in files)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    printed = capsys.readouterr().out
    assert "embedded 70 images" in printed and "images/s" in printed
    assert "skipped 1 {'truncated': 1}" in printed or "skipped 1 {'not_an_image': 1}" in printed

    # The rows are the backbone's features of those very files.
    checkpoint = resolve_checkpoint(
        "random", "sqlite:///unused.db", backbone="resnet18", image_size=32
    )
    model = build_frozen_backbone(checkpoint.spec, checkpoint.state_dict)
    rows = table.to_pydict()
    key, embedding = rows["key"][5], np.asarray(rows["embedding"][5], np.float32)
    image = torch.tensor(resize_center_crop(decode_pil(Path(key).read_bytes()), 32))
    mean = torch.tensor(checkpoint.spec.mean).view(3, 1, 1)
    std = torch.tensor(checkpoint.spec.std).view(3, 1, 1)
    with torch.no_grad():
        expected = model(((image.float() / 255 - mean) / std)[None])[0].numpy()
    np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-4)

    # A second run refuses to mix its files with the first run's.
    assert cli_main([*args, "--data", str(tmp_path / "corpus"), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_actor_plan_takes_one_gpu_per_actor_when_there_are_gpus():
    gpu = plan_actors(resources={"CPU": 16.0, "GPU": 2.0})
    assert (gpu.concurrency, gpu.num_gpus) == (2, 1)
    cpu = plan_actors(resources={"CPU": 8.0}, cpus_per_actor=2)
    assert (cpu.concurrency, cpu.num_gpus, cpu.num_cpus) == (4, 0, 7.5 / 4)
    assert plan_actors(3, resources={"CPU": 8.0}).concurrency == 3


def test_actors_leave_the_reads_room_on_a_small_machine():
    """2 CPUs: the actors together leave room for a read and a decode task (two one-CPU
    actors held both CPUs and the reads never ran; then 2 x 0.875 left no room for the
    1-CPU decode task: the full CIFAR-10 hung)."""
    for cpus in (1.0, 2.0, 3.0, 16.0):
        plan = plan_actors(resources={"CPU": cpus})
        assert plan.concurrency * plan.num_cpus + DECODE_CPUS + 0.05 <= cpus
        assert plan.num_cpus <= 1
    assert plan_actors(resources={"CPU": 2.0}).concurrency == 2


def test_random_init_is_the_same_for_every_caller():
    a = resolve_checkpoint("random", "sqlite:///unused.db", backbone="resnet18", image_size=32)
    b = resolve_checkpoint("random", "sqlite:///unused.db", backbone="resnet18", image_size=32)
    assert a.spec == BackboneSpec("resnet18", False, 32)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
