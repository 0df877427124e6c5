"""Beyond one machine: SRC expansion, the Parquet sink (atomic parts, resume), and the Ray Data jobs on a local
cluster (prediction equal to the single-machine pipeline, kill -9 then --resume, feature extraction for train)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import link_subset, shared_dataset
from tlearn.errors import InvalidParameter
from tlearn.predict import Prediction, Unreadable
from tlearn.sinks import ParquetSink, PredictionColumns, read_predictions
from tlearn.sources import expand_sources

pa = pytest.importorskip("pyarrow")


# ---- sources ----------------------------------------------------------------------------------------------------
def test_sources_expand_folders_globs_and_manifests_once_each(hymenoptera_small, tmp_path):
    ants = sorted(str(p) for p in (hymenoptera_small / "train" / "ants").iterdir())
    (tmp_path / "list.txt").write_text(f"# a comment\n{ants[0]}\n\nnot-here.jpg\n")
    (tmp_path / "list.csv").write_text(f"label,path\nant,{ants[1]}\nant,{ants[0]}\n")
    found = expand_sources([hymenoptera_small / "train" / "ants", str(hymenoptera_small / "val" / "*" / "*.jpg"),
                            tmp_path / "list.txt", tmp_path / "list.csv", tmp_path / "nothing" / "*.png"])
    val = sorted(str(p) for p in (hymenoptera_small / "val").rglob("*.jpg"))
    assert found.files == ants + val  # the manifests only repeat files already named: each path once
    assert [(m.source, m.reason) for m in found.missing] == [
        (str(tmp_path / "not-here.jpg"), "no such file or folder"),  # relative to the manifest's folder
        (str(tmp_path / "nothing" / "*.png"), "the pattern matches no image file")]
    assert found.without(set(ants)).files == val


def test_sources_follow_symlinked_folders_without_looping(hymenoptera_small, tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ants").symlink_to(hymenoptera_small / "train" / "ants")
    (tmp_path / "root" / "loop").symlink_to(tmp_path / "root")
    found = expand_sources([tmp_path / "root"])
    assert len(found.files) == 6
    assert [(Path(m.source).name, "loop" in m.reason) for m in found.missing] == [("loop", True)]  # a row, named


# ---- sink -------------------------------------------------------------------------------------------------------
COLUMNS = PredictionColumns("abc", "0.0", ("ants", "bees"), top_k=2, probabilities=True)


def _rows(names):
    return [Unreadable(n, "corrupt") if n.startswith("bad") else
            Prediction(n, (("bees", 0.75), ("ants", 0.25)), False, (0.25, 0.75)) for n in names]


def test_sink_writes_whole_parts_a_manifest_and_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "out.parquet"
    sink = ParquetSink(out, COLUMNS, part_rows=2)
    sink.write_rows(_rows(["a", "b", "bad1", "c", "d"]))
    (out / ".part-000009.parquet.123.tmp").write_bytes(b"half a part")  # what a kill -9 mid-write leaves
    manifest = sink.finish(images_per_second=1.0)
    assert (manifest["rows"], manifest["errors"], manifest["parts"]) == (5, 1, 3)
    assert (out / "_SUCCESS").exists()
    table = read_predictions(out).to_pylist()
    assert [r["path"] for r in table] == ["a", "b", "bad1", "c", "d"]
    assert table[0]["label"] == "bees" and table[0]["top_labels"] == ["bees", "ants"]
    assert table[0]["probabilities"] == [0.25, 0.75] and table[0]["error"] is None
    assert table[2]["error"] == "corrupt" and table[2]["label"] is None and table[2]["model_sha256"] == "abc"
    with pytest.raises(InvalidParameter, match="--resume"):
        ParquetSink(out, COLUMNS)
    with pytest.raises(InvalidParameter, match="another model"):
        ParquetSink(out, PredictionColumns("other", "0.0", ("ants", "bees"), 2, True), resume=True)
    again = ParquetSink(out, COLUMNS, resume=True)
    assert again.done == {"a", "b", "bad1", "c", "d"} and not list(out.glob(".*.tmp"))
    assert not (out / "_SUCCESS").exists()  # until the resumed run finishes
    again.write_rows(_rows(["e"]))
    assert again.finish()["rows"] == 6 and len(read_predictions(out)) == 6


# ---- Ray --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def hym_model(hymenoptera_model) -> Path:
    return hymenoptera_model


@pytest.fixture(scope="module")
def images_and_corrupt(tmp_path_factory) -> list[str]:
    """Real photos of both shared datasets, plus a text file, a truncated JPEG and a missing path."""
    root = tmp_path_factory.mktemp("ray-images")
    link_subset(shared_dataset("hymenoptera"), root / "hym", {"val": 5}, seed=1)
    link_subset(shared_dataset("oxford17flowers"), root / "flowers", {"test": 1}, seed=1)
    (root / "text.jpg").write_text("not an image")
    photo = next((root / "hym").rglob("*.jpg")).read_bytes()
    (root / "truncated.jpg").write_bytes(photo[:len(photo) // 3])
    return [str(root / "hym"), str(root / "flowers"), str(root / "text.jpg"), str(root / "truncated.jpg"),
            str(root / "missing.jpg")]


def _by_path(folder: Path) -> dict[str, dict]:
    return {row["path"]: row for row in read_predictions(folder).to_pylist()}


def test_ray_predictions_equal_the_single_machine_ones(ray_address, hym_model, images_and_corrupt, tmp_path):
    from tlearn.distributed import predict_to_parquet

    local = predict_to_parquet(hym_model, images_and_corrupt, tmp_path / "local.parquet", top_k=2, probabilities=True)
    on_ray = predict_to_parquet(hym_model, images_and_corrupt, tmp_path / "ray.parquet", ray=True,
                                address=ray_address, top_k=2, probabilities=True)
    assert (local["mode"], on_ray["mode"], on_ray["cores"]) == ("local", "ray", 2)
    a, b = _by_path(tmp_path / "local.parquet"), _by_path(tmp_path / "ray.parquet")
    assert len(a) == 10 + 17 + 3 and sorted(a) == sorted(b)
    errors = {Path(p).name: row["error"] for p, row in b.items() if row["error"]}
    assert sorted(errors) == ["missing.jpg", "text.jpg", "truncated.jpg"]
    assert "truncated" in errors["truncated.jpg"] and "no such file" in errors["missing.jpg"]
    for path, row in a.items():
        assert (row["label"], row["top_labels"], row["error"]) == (b[path]["label"], b[path]["top_labels"],
                                                                  b[path]["error"])
        if row["error"] is None:
            assert np.allclose(row["probabilities"], b[path]["probabilities"], atol=1e-5, rtol=0)
    assert local["errors"] == on_ray["errors"] == 3


def test_concurrent_batches_run_whole_on_the_streams_with_the_same_outputs(hym_model, hymenoptera_small):
    """The actors' way (each batch whole on one stream, calls in threads) gives what one caller gets."""
    from concurrent.futures import ThreadPoolExecutor

    from tlearn.predict import Predictor

    predictor = Predictor.load(hym_model)
    photos = sorted(hymenoptera_small.rglob("*.jpg"))
    batches = [np.stack([predictor.to_pixels(p) for p in photos[i:i + 5]]) for i in range(0, 20, 5)]
    alone = [predictor.probabilities(b) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: predictor.probabilities(b, concurrent=True), batches))
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(alone, together))
    if hasattr(predictor.engine, "run_whole"):  # test-time augmentation's mean of views, the same way
        from tlearn.engines.views import MeanOfViews

        views = MeanOfViews(predictor.engine)
        assert np.abs(views.run_whole(batches[0]) - views(batches[0])).max() <= 1e-5


def test_a_job_has_a_fixed_object_store_budget_then_leaves_the_context_as_it_was(ray_address):
    import ray

    from tlearn.distributed.cluster import BUDGET_PER_CORE, ray_cluster

    limits = ray.data.DataContext.get_current().execution_options
    with ray_cluster(ray_address) as cluster:
        assert limits.resource_limits.object_store_memory == BUDGET_PER_CORE * cluster.cores
    assert limits.resource_limits.object_store_memory == float("inf") and ray.is_initialized()


@pytest.mark.slow
def test_kill_9_then_resume_writes_every_path_exactly_once(ray_address, hym_model, tmp_path):
    from tlearn.distributed import predict_to_parquet

    many = tmp_path / "many"
    many.mkdir()
    photos = sorted(shared_dataset("hymenoptera").rglob("*.jpg"))[:60]
    for copy in range(8):  # distinct names, the same photos
        for i, photo in enumerate(photos):
            (many / f"{copy}-{i:03d}.jpg").symlink_to(photo)
    out = tmp_path / "out.parquet"
    script = ("from tlearn.distributed import predict_to_parquet\n"
              f"predict_to_parquet({str(hym_model)!r}, [{str(many)!r}], {str(out)!r}, ray=True, "
              f"address={ray_address!r}, part_rows=8, batch_size=8)\n")
    job = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before it could be killed halfway"
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = read_predictions(out).column("path").to_pylist()
    assert not (out / "_SUCCESS").exists() and 0 < len(written) < 480
    manifest = predict_to_parquet(hym_model, [many], out, ray=True, address=ray_address, resume=True, part_rows=8)
    paths = read_predictions(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in many.iterdir())  # every path, exactly once
    assert manifest["rows_before_resume"] == len(written) and manifest["rows"] == 480
    assert (out / "_SUCCESS").exists()


def test_train_on_ray_gives_the_local_model(ray_address, hym_model, hymenoptera_small, cache_dir, tmp_path):
    """The actors fill a fresh feature cache; the head is then fitted on it as after a local extraction."""
    import tlearn
    from tlearn.data.decode import content_hash
    from tlearn.distributed import extract_features_ray
    from tlearn.features import FeatureCache

    clf = tlearn.ImageClassifier(cache_dir=tmp_path / "cache", progress=False, ray=ray_address).fit(hymenoptera_small)
    local = tlearn.load(hym_model)  # trained locally on the same data, features in the session's cache
    assert clf.summary_.extracted == 0  # every feature came from the actors, through the cache
    assert clf.metrics_ == local.metrics_
    key = clf.bundle_.backbone.feature_key
    paths = sorted(hymenoptera_small.rglob("*.jpg"))
    hashes = [content_hash(p) for p in paths]
    with FeatureCache(key, tmp_path / "cache") as on_ray, FeatureCache(key, cache_dir) as here:
        a, b = on_ray.get_many(hashes), here.get_many(hashes)
        assert len(a) == len(paths) and max(np.abs(a[h] - b[h]).max() for h in hashes) <= 1e-5

        text = tmp_path / "text.jpg"  # a file that cannot be decoded: remembered by content, as locally
        text.write_text("not an image")
        engines = on_ray.directory / "engines"
        done = extract_features_ray([text], [content_hash(text)], clf_engine_key(clf), engines,
                                    clf.bundle_.preprocessing, on_ray, ray_address)
        assert done.computed == 0 and [(p.name, "not an image" in r) for p, r in done.failures] == [("text.jpg", True)]
        assert on_ray.failures([content_hash(text)])


def clf_engine_key(clf) -> str:
    from tlearn.engines import state_key

    return state_key(clf.bundle_.backbone_state(), clf.bundle_.preprocessing)


def test_cli_ray_needs_parquet_output(hym_model, tmp_path):
    from typer.testing import CliRunner

    from tlearn.cli import app

    result = CliRunner().invoke(app, ["predict", str(hym_model), str(tmp_path), "--ray", "local"])
    assert result.exit_code == 2 and "--output OUT.parquet" in result.output
    (tmp_path / "bad.jpg").write_text("not an image")
    result = CliRunner().invoke(app, ["predict", str(hym_model), str(tmp_path / "bad.jpg"), "--output",
                                      str(tmp_path / "out.parquet")])
    assert result.exit_code == 1 and "1 unreadable" in result.output  # as for CSV: a row says why
    assert read_predictions(tmp_path / "out.parquet").column("error").to_pylist()[0].startswith("not an image")
