"""S3 sources against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from pipelines.ingest.dataset import ingest_counts, view_dataset
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import ImageSource, read_raw

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')"
)
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3_endpoint, corpus):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="corpus")
    client.upload_file(str(corpus["parquet"]), "corpus", "parquet/mixed.parquet")
    for path in sorted(corpus["folder"].rglob("*")):
        if path.is_file():
            key = "folder/" + str(path.relative_to(corpus["folder"]))
            client.upload_file(str(path), "corpus", key)
    return "corpus"


def test_parquet_on_s3(ray_session, s3_endpoint, bucket, corpus):
    source = ImageSource(
        f"s3://{bucket}/parquet/", image_column="img", label_column="y", s3_endpoint=s3_endpoint
    )
    keys = read_raw(source).take_batch(1000)["key"]
    assert keys[0].startswith("s3://corpus/parquet/mixed.parquet#")
    ds = view_dataset(source, simclr(8), seed=0, counter="t-s3")
    assert ds.count() == corpus["n_good"]
    assert ingest_counts("t-s3")["skipped_by_reason"] == corpus["bad_reasons"]


def test_folder_and_missing_path_on_s3(ray_session, s3_endpoint, bucket, corpus):
    folder = ImageSource(f"s3://{bucket}/folder", label_column="folder", s3_endpoint=s3_endpoint)
    assert read_raw(folder).count() == corpus["n_good"] + 4
    paths = ImageSource(
        [f"s3://{bucket}/folder/class0/empty.jpg", f"s3://{bucket}/folder/class0/gone.jpg"],
        s3_endpoint=s3_endpoint,
    )
    view_dataset(paths, simclr(8), seed=0, counter="t-s3-paths").count()
    assert ingest_counts("t-s3-paths")["skipped_by_reason"] == {"empty": 1, "missing": 1}
